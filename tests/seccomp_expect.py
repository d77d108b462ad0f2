"""What the default seccomp profile must answer, shared by the profile's unit tests and
the integration tests that probe it inside containers."""

# Refused with EPERM by the default profile whatever the arguments.
REFUSED_WITH_EPERM = (
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "clock_settime",
    "settimeofday",
    "adjtimex",
    "clock_adjtime",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "setns",
    "mount",
)
