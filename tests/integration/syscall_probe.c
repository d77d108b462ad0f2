/*
 * probe: tries the syscalls the seccomp and CVE tests ask about, from inside a container.
 *
 * Built static by tests/integration/probe.py and copied into a container image. Each
 * argument names one attempt; one line per argument is printed: "NAME=OK" or
 * "NAME=<errno name>" (EPERM, ENOSYS, ...). It never stops at a failure.
 *
 *   keyctl add_key request_key bpf io_uring io_setup userfaultfd perf clone3 clone-newuser
 *   unshare-user unshare-net setns fsopen open_tree clock_settime
 *   tiocsti tiocsti-high tioclinux     on fd 0, which the test makes a terminal
 *   inject:TEXT                        TIOCSTI every byte of TEXT into fd 0
 *   setflags:FILE fssetxattr:FILE      set a file's flags / fsxattr to what they are
 *   vsock nr:N                         socket(AF_VSOCK), syscall number N
 *   exe:PID                            open /proc/PID/exe for writing
 *   ptys:N                             open /dev/pts/ptmx up to N times, all kept open:
 *                                      "ptys=<opened>" then the errno that stopped it
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef TIOCLINUX
#define TIOCLINUX 0x541C
#endif
#define KEYCTL_GET_KEYRING_ID 0
#define KEY_SPEC_SESSION_KEYRING -3
#define UFFD_USER_MODE_ONLY 1

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

/* Perf's attribute struct, as far as PERF_ATTR_SIZE_VER0 (64 bytes) reaches. */
struct perf_attr_v0 {
    uint32_t type, size;
    uint64_t config, sample_period, sample_type, read_format, flags;
    uint32_t wakeup_events, bp_type;
    uint64_t bp_addr;
};

static const char *ename(int e) {
    static char buf[16];
    switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EIO: return "EIO";
    case ENOENT: return "ENOENT";
    case ETXTBSY: return "ETXTBSY";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EFAULT: return "EFAULT";
    case ENOKEY: return "ENOKEY";
    case EBADF: return "EBADF";
    case ELOOP: return "ELOOP";
    case ENOSPC: return "ENOSPC";
    }
    snprintf(buf, sizeof buf, "E%d", e);
    return buf;
}

static void report(const char *what, long rc) {
    if (rc < 0)
        printf("%s=%s\n", what, ename(errno));
    else
        printf("%s=OK\n", what);
    fflush(stdout);
}

/* A clone that succeeded made a child: it leaves at once, the parent reaps it. */
static long forked(long rc) {
    if (rc == 0)
        _exit(0);
    if (rc > 0)
        waitpid((pid_t)rc, NULL, __WALL);
    return rc;
}

static long file_ioctl(const char *path, unsigned long get, unsigned long set, void *buf) {
    int fd = open(path, O_RDONLY | O_CREAT, 0644);
    long rc;
    if (fd < 0)
        return -1;
    rc = ioctl(fd, get, buf);
    if (rc == 0)
        rc = syscall(SYS_ioctl, fd, set, buf);
    close(fd);
    return rc;
}

static void probe(const char *a) {
    char c = ' ';
    if (!strcmp(a, "keyctl"))
        report(a, syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1));
    else if (!strcmp(a, "add_key"))
        report(a, syscall(SYS_add_key, "user", "rexec-probe", "x", 1, KEY_SPEC_SESSION_KEYRING));
    else if (!strcmp(a, "request_key"))
        report(a, syscall(SYS_request_key, "user", "rexec-probe-none", NULL, 0));
    else if (!strcmp(a, "bpf")) {
        char attr[128] = {0};
        report(a, syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, attr, sizeof attr));
    } else if (!strcmp(a, "io_uring")) {
        char params[120] = {0};
        report(a, syscall(SYS_io_uring_setup, 1, params));
    } else if (!strcmp(a, "io_setup")) {
        /* One event: the test must not take the host's AIO contexts itself. */
        unsigned long ctx = 0;
        long rc = syscall(SYS_io_setup, 1, &ctx);
        if (rc == 0)
            syscall(SYS_io_destroy, ctx);
        report(a, rc);
    } else if (!strcmp(a, "userfaultfd"))
        report(a, syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
    else if (!strcmp(a, "perf")) {
        struct perf_attr_v0 attr = {0};
        attr.type = 1;   /* PERF_TYPE_SOFTWARE */
        attr.config = 1; /* PERF_COUNT_SW_TASK_CLOCK */
        attr.size = sizeof attr;
        attr.flags = 1ULL << 5 | 1ULL << 6; /* exclude_kernel, exclude_hv */
        report(a, syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));
    } else if (!strcmp(a, "clone3")) {
        struct clone_args_v0 args = {0};
        args.exit_signal = SIGCHLD;
        report(a, forked(syscall(SYS_clone3, &args, sizeof args)));
    } else if (!strcmp(a, "clone-newuser"))
        report(a, forked(syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)));
    else if (!strcmp(a, "unshare-user"))
        report(a, unshare(CLONE_NEWUSER));
    else if (!strcmp(a, "unshare-net"))
        report(a, unshare(CLONE_NEWNET));
    else if (!strcmp(a, "setns"))
        report(a, setns(open("/proc/1/ns/uts", O_RDONLY), 0));
    else if (!strcmp(a, "fsopen"))
        report(a, syscall(SYS_fsopen, "tmpfs", 0));
    else if (!strcmp(a, "open_tree"))
        report(a, syscall(SYS_open_tree, AT_FDCWD, "/tmp", 1 /* OPEN_TREE_CLONE */));
    else if (!strcmp(a, "clock_settime")) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        report(a, syscall(SYS_clock_settime, CLOCK_REALTIME, &ts));
    } else if (!strcmp(a, "tiocsti"))
        report(a, ioctl(0, TIOCSTI, &c));
    else if (!strcmp(a, "tiocsti-high"))
        report(a, syscall(SYS_ioctl, 0, 0x100000000UL | TIOCSTI, &c));
    else if (!strcmp(a, "tioclinux")) {
        char sub = 7; /* TIOCL_GETSHIFTSTATE */
        report(a, ioctl(0, TIOCLINUX, &sub));
    } else if (!strncmp(a, "inject:", 7)) {
        long rc = 0;
        for (const char *p = a + 7; *p && rc == 0; p++)
            rc = ioctl(0, TIOCSTI, p);
        report("inject", rc);
    } else if (!strncmp(a, "setflags:", 9)) {
        long flags = 0;
        report("setflags", file_ioctl(a + 9, FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, &flags));
    } else if (!strncmp(a, "fssetxattr:", 11)) {
        struct fsxattr fa;
        report("fssetxattr", file_ioctl(a + 11, FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR, &fa));
    } else if (!strcmp(a, "vsock"))
        report(a, socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    else if (!strncmp(a, "nr:", 3))
        report("nr", syscall(atol(a + 3), 0, 0, 0, 0, 0, 0));
    else if (!strncmp(a, "ptys:", 5)) {
        long want = atol(a + 5), got = 0, rc = 0;
        while (got < want && (rc = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)) >= 0)
            got++;
        printf("ptys=%ld\n", got);
        report("ptys-next", got < want ? rc : 0);
    } else if (!strncmp(a, "exe:", 4)) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%s/exe", a + 4);
        report("exe", open(path, O_WRONLY));
    } else
        printf("%s=UNKNOWN-PROBE\n", a);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        probe(argv[i]);
    return 0;
}
