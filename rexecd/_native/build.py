"""cffi out-of-line API build of ``rexecd._native._lowlevel``: the syscalls Python 3.11 lacks.

Only thin C shims live here; argument checking and errno translation are done by the
Python wrappers in ``rexecd._native`` so each failure carries the path it concerns.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    int rx_unshare(int flags);
    int rx_setns(int fd, int nstype);
    int rx_mount(const char *source, const char *target, const char *fstype,
                 unsigned long flags, const char *data);
    int rx_umount2(const char *target, int flags);
    int rx_pivot_root(const char *new_root, const char *put_old);
    int rx_openat2(int dirfd, const char *path, unsigned long long flags,
                   unsigned long long mode, unsigned long long resolve);
    int rx_close_range(unsigned int first, unsigned int last, unsigned int flags);
    int rx_memfd_create(const char *name, unsigned int flags);
    int rx_mknodat(int dirfd, const char *path, unsigned int mode,
                   unsigned int major, unsigned int minor);
    int rx_sethostname(const char *name, size_t len);
    int rx_syncfs(int fd);
    int rx_quotactl_fd(int fd, unsigned int cmd, unsigned int id, void *addr);
    long rx_join_session_keyring(const char *name);
    int rx_fstatfs_type(int fd, long long *type);
    """
)

# inotify (cgroup v2 memory.events watches): Python has no binding of its own.
ffibuilder.cdef(
    """
    int rx_inotify_init1(int flags);
    int rx_inotify_add_watch(int fd, const char *path, uint32_t mask);
    """
)

ffibuilder.set_source(
    "rexecd._native._lowlevel",
    r"""
    #define _GNU_SOURCE
    #include <errno.h>
    #include <sched.h>
    #include <stdint.h>
    #include <string.h>
    #include <unistd.h>
    #include <sys/mount.h>
    #include <sys/stat.h>
    #include <sys/sysmacros.h>
    #include <sys/syscall.h>
    #include <sys/mman.h>
    #include <linux/keyctl.h>
    #include <sys/vfs.h>
    #include <linux/openat2.h>

    int rx_unshare(int flags) { return unshare(flags); }
    int rx_setns(int fd, int nstype) { return setns(fd, nstype); }
    int rx_mount(const char *source, const char *target, const char *fstype,
                 unsigned long flags, const char *data) {
        return mount(source, target, fstype, flags, data);
    }
    int rx_umount2(const char *target, int flags) { return umount2(target, flags); }
    int rx_pivot_root(const char *new_root, const char *put_old) {
        return (int)syscall(SYS_pivot_root, new_root, put_old);
    }
    int rx_openat2(int dirfd, const char *path, unsigned long long flags,
                   unsigned long long mode, unsigned long long resolve) {
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = flags;
        how.mode = mode;
        how.resolve = resolve;
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    }
    int rx_close_range(unsigned int first, unsigned int last, unsigned int flags) {
        return (int)syscall(SYS_close_range, first, last, flags);
    }
    int rx_memfd_create(const char *name, unsigned int flags) {
        return (int)syscall(SYS_memfd_create, name, flags);
    }
    int rx_mknodat(int dirfd, const char *path, unsigned int mode,
                   unsigned int major, unsigned int minor) {
        return mknodat(dirfd, path, (mode_t)mode, makedev(major, minor));
    }
    int rx_sethostname(const char *name, size_t len) { return sethostname(name, len); }
    int rx_syncfs(int fd) { return syncfs(fd); }
    int rx_quotactl_fd(int fd, unsigned int cmd, unsigned int id, void *addr) {
    #ifdef SYS_quotactl_fd
        return (int)syscall(SYS_quotactl_fd, fd, cmd, id, addr);
    #else
        /* Headers older than Linux 5.14: report it as the kernel would. */
        errno = ENOSYS;
        return -1;
    #endif
    }
    long rx_join_session_keyring(const char *name) {
        return syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, name);
    }
    int rx_fstatfs_type(int fd, long long *type) {
        struct statfs st;
        if (fstatfs(fd, &st) < 0)
            return -1;
        *type = (long long)st.f_type;
        return 0;
    }
    """
    + r"""
    #include <sys/inotify.h>

    int rx_inotify_init1(int flags) { return inotify_init1(flags); }
    int rx_inotify_add_watch(int fd, const char *path, uint32_t mask) {
        return inotify_add_watch(fd, path, mask);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
