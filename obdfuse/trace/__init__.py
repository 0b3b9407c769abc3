"""I/O traces: record the block reads of a start-up, replay them as prefetch (spec §7).

Modules: `format` (binary trace and text prefetch list, sans-IO), `recorder`
(record mode: log every read the Stack makes of its lower layers), `replay`
(prefetch a trace, coalesced into few large cache fills), `extents` (resolve a
prefetch list's paths to image extents with debugfs), `session` (the §7.2
mode of a trace path run beside a mount).
"""
