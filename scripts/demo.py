"""Demo placeholder: replaced by the ZFile round trip, then a mount, then a lazy mount."""

print("obdfuse demo: nothing to show yet")
