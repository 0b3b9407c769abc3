"""libiscsi's conformance suite (`iscsi-test-cu -d -t ALL`) against obdfuse, with
Debian's tgt serving an identical file in the same run as the reference."""

from __future__ import annotations

import json

import pytest

from tests.support.iscsi import ObdfuseTarget, TgtTarget, run_test_cu

# Tests that may not pass, with the reason. Empty: obdfuse passes every test it runs.
KNOWN_FAILURES: dict[str, str] = {}

# Tests that skip (libiscsi counts them as passes; we do not), by reason.
_SKIP_REASONS = {
    "EXTENDED COPY / RECEIVE COPY RESULTS are not implemented": [
        *(f"ExtendedCopy.{t}" for t in ("Simple", "ParamHdr", "DescrLimits", "DescrType",
                                         "ValidTgtDescr", "ValidSegDescr")),
        "ReceiveCopyResults.CopyStatus", "ReceiveCopyResults.OpParams",
    ],
    "the LU is a fixed disk: no removable medium to lock or eject": [
        *(f"PreventAllow.{t}" for t in ("Simple", "Eject", "ITNexusLoss", "Logout",
                                         "WarmReset", "ColdReset", "LUNReset", "2ITNexuses")),
        "StartStopUnit.Simple",
    ],
    "SANITIZE is not implemented (and not enabled without -S)": [
        *(f"Sanitize.{t}" for t in ("BlockErase", "BlockEraseReserved", "CryptoErase",
                                     "CryptoEraseReserved", "ExitFailureMode",
                                     "InvalidServiceAction", "Overwrite", "OverwriteReserved",
                                     "Readonly", "Reservations", "Reset")),
    ],
    "WRITE ATOMIC(16) is not implemented": [
        f"WriteAtomic16.{t}" for t in ("Simple", "BeyondEol", "ZeroBlocks", "WriteProtect",
                                        "DpoFua", "VPD")
    ],
    "needs a read-only LU (covered by test_read_only_lun_subset)": ["ReadOnly.ReadOnlySBC"],
    "need more than one logical block per physical block (we report LBPPBE 0, "
    "see docs/benchmarks.md)": [
        "CompareAndWrite.InvalidDataOutSize", "WriteSame10.UnmapUnaligned",
        "WriteSame10.InvalidDataOutSize", "WriteSame16.UnmapUnaligned",
        "WriteSame16.InvalidDataOutSize",
    ],
    "need a second URL (multipath)": [
        "MultipathIO.Simple", "MultipathIO.Reset", "MultipathIO.CompareAndWrite",
        "MultipathIO.CompareAndWriteAsync",
    ],
}
EXPECTED_SKIPS = {name for names in _SKIP_REASONS.values() for name in names}


def _sparse(path, size=64 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.slow
def test_conformance_all_beside_tgt(tmp_path, capsys):
    with TgtTarget(_sparse(tmp_path / "tgt.img")) as tgt:
        ref = run_test_cu(tgt.url)
    with ObdfuseTarget("--raw", "--writable", str(_sparse(tmp_path / "obd.img")),
                       log=tmp_path / "target.log") as target:
        ours = run_test_cu(target.url)
        assert target.proc is not None and target.proc.poll() is None, "target died"
    counts = {
        name: {"tests": r.total, "passed": r.passed, "failed": r.failed, "skipped": r.skipped,
               "seconds": round(r.seconds, 1)}
        for name, r in (("obdfuse", ours), ("tgt", ref))
    }
    with capsys.disabled():
        print("\niscsi-test-cu -d -t ALL:", json.dumps(counts))
        if ref.failures:
            print("tgt failures:", ", ".join(ref.failures))
    assert ours.total == 230, ours.log[-3000:]
    assert sorted(ours.failures) == sorted(KNOWN_FAILURES), ours.failures
    assert ours.failed == len(KNOWN_FAILURES)
    unexpected_skips = set(ours.skips) - EXPECTED_SKIPS
    assert not unexpected_skips, f"tests newly skipped: {sorted(unexpected_skips)}"
    assert ours.passed >= ref.passed, counts


def test_read_only_lun_subset(tmp_path):
    """A read-only LU: writes fail with DATA PROTECT, which ReadOnly.* checks."""
    disk = _sparse(tmp_path / "ro.img", 16 << 20)
    with ObdfuseTarget("--raw", str(disk)) as target:
        res = run_test_cu(target.url, "SCSI.ReadOnly,SCSI.Read10,SCSI.Inquiry,SCSI.ModeSense6")
    assert res.total > 10
    assert res.failed == 0, res.failures
    assert "ReadOnly.ReadOnlySBC" not in res.skips


@pytest.mark.slow
def test_conformance_writes_on_an_image_upper(tmp_path, samples):
    """The write families against a real image with a writable upper layer (a `Stack`)."""
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(samples / "layers/l1.commit")}]}))
    with ObdfuseTarget("--upper", str(tmp_path / "upper"), str(cfg)) as target:
        res = run_test_cu(target.url, "SCSI.Write10,SCSI.WriteSame16,SCSI.Unmap,"
                                      "SCSI.CompareAndWrite,SCSI.GetLBAStatus")
    assert res.total >= 25
    assert res.failed == 0, res.failures


def test_multipath_two_sessions_to_one_lu(tmp_path):
    """A second URL makes libiscsi open two sessions and run MultipathIO (and the
    two-nexus variants of other tests) through both."""
    disk = _sparse(tmp_path / "mp.img", 16 << 20)
    with ObdfuseTarget("--raw", "--writable", str(disk)) as target:
        res = run_test_cu(target.url, "SCSI.MultipathIO,SCSI.Reserve6,SCSI.CompareAndWrite",
                          second_url=target.url)
    assert res.failed == 0, res.failures
    assert not [name for name in res.skips if name.startswith("MultipathIO.")], res.skips
    assert res.total >= 15
