"""cffi out-of-line API build of ``rexecd._native._lowlevel``: the syscalls Python 3.11 lacks,
and the few libseccomp calls that compile a seccomp profile into BPF.

Only thin C shims live here; argument checking and errno translation are done by the
Python wrappers in ``rexecd._native`` so each failure carries the path it concerns.
Links libseccomp (``libseccomp-dev`` to build, ``libseccomp2`` to run).
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
    int rx_open_tree(int dirfd, const char *path, unsigned int flags);
    int rx_mount_setattr_idmap(int fd, int userns_fd, unsigned long long attr_set);

    static const unsigned int SCMP_ACT_ALLOW;
    static const unsigned int SCMP_ACT_KILL_PROCESS;
    static const unsigned int SCMP_ACT_KILL_THREAD;
    static const unsigned int SCMP_ACT_TRAP;
    static const unsigned int SCMP_ACT_LOG;
    static const int SCMP_CMP_NE;
    static const int SCMP_CMP_LT;
    static const int SCMP_CMP_LE;
    static const int SCMP_CMP_EQ;
    static const int SCMP_CMP_GE;
    static const int SCMP_CMP_GT;
    static const int SCMP_CMP_MASKED_EQ;
    void *rx_scmp_new(unsigned int default_action, unsigned int badarch_action);
    void rx_scmp_release(void *ctx);
    int rx_scmp_resolve(const char *name);
    int rx_scmp_rule(void *ctx, unsigned int action, int nr, unsigned int count,
                     const unsigned int *index, const int *op,
                     const uint64_t *datum_a, const uint64_t *datum_b);
    int rx_scmp_export(void *ctx, int fd, int pfc);
    int rx_seccomp_install(const void *prog, unsigned int size);
    int rx_capbset_drop_except(uint64_t keep, int last);
    int rx_clear_inheritable(void);
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
    #include <linux/capability.h>
    #include <linux/keyctl.h>
    #include <sys/prctl.h>
    #include <sys/vfs.h>
    #include <linux/filter.h>
    #include <linux/openat2.h>
    #include <linux/seccomp.h>
    #include <seccomp.h>

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

    int rx_open_tree(int dirfd, const char *path, unsigned int flags) {
    #ifdef SYS_open_tree
        return (int)syscall(SYS_open_tree, dirfd, path, flags);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }
    /* mount_setattr(fd, "", AT_EMPTY_PATH, {attr_set | MOUNT_ATTR_IDMAP, userns_fd}):
       headers may predate struct mount_attr (Linux 5.12), so it is spelt out here. */
    int rx_mount_setattr_idmap(int fd, int userns_fd, unsigned long long attr_set) {
    #ifdef SYS_mount_setattr
        struct { uint64_t attr_set, attr_clr, propagation, userns_fd; } attr;
        memset(&attr, 0, sizeof attr);
        attr.attr_set = attr_set | 0x00100000ULL; /* MOUNT_ATTR_IDMAP */
        attr.userns_fd = (uint64_t)userns_fd;
        return (int)syscall(SYS_mount_setattr, fd, "", 0x1000 /* AT_EMPTY_PATH */,
                            &attr, sizeof attr);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }

    /* libseccomp answers -errno instead of setting errno: put it where Python looks. */
    static int rx_scmp_rc(int rc) {
        if (rc < 0) {
            errno = -rc;
            return -1;
        }
        return rc;
    }
    void *rx_scmp_new(unsigned int default_action, unsigned int badarch_action) {
        scmp_filter_ctx ctx = seccomp_init(default_action);
        int rc;
        if (ctx == NULL) {
            errno = EINVAL;
            return NULL;
        }
        /* Level 2: a binary tree over the syscall numbers instead of a linear chain. */
        rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
        if (rc == 0)
            rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, badarch_action);
        if (rc < 0) {
            seccomp_release(ctx);
            errno = -rc;
            return NULL;
        }
        return ctx;
    }
    void rx_scmp_release(void *ctx) { seccomp_release(ctx); }
    int rx_scmp_resolve(const char *name) { return seccomp_syscall_resolve_name(name); }
    int rx_scmp_rule(void *ctx, unsigned int action, int nr, unsigned int count,
                     const unsigned int *index, const int *op,
                     const uint64_t *datum_a, const uint64_t *datum_b) {
        struct scmp_arg_cmp cmp[6];
        unsigned int i;
        if (count > 6) {
            errno = EINVAL;
            return -1;
        }
        for (i = 0; i < count; i++) {
            cmp[i].arg = index[i];
            cmp[i].op = (enum scmp_compare)op[i];
            cmp[i].datum_a = datum_a[i];
            cmp[i].datum_b = datum_b[i];
        }
        return rx_scmp_rc(seccomp_rule_add_array(ctx, action, nr, count, cmp));
    }
    int rx_scmp_export(void *ctx, int fd, int pfc) {
        return rx_scmp_rc(pfc ? seccomp_export_pfc(ctx, fd) : seccomp_export_bpf(ctx, fd));
    }
    /* The capability drop before every execve, in one call: python-prctl took 0.3 ms
     * for it (a wrapper call per capability, libcap for the inheritable set). */
    int rx_capbset_drop_except(uint64_t keep, int last) {
        int cap;
        for (cap = 0; cap <= last; cap++)
            if ((cap > 63 || !(keep & (1ULL << cap)))
                && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
                return -1;
        return 0;
    }
    int rx_clear_inheritable(void) {
        struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
        int i;
        if (syscall(SYS_capget, &hdr, data) < 0)
            return -1;
        for (i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
            data[i].inheritable = 0;
        return (int)syscall(SYS_capset, &hdr, data);
    }
    int rx_seccomp_install(const void *prog, unsigned int size) {
        struct sock_fprog fprog;
        if (size == 0 || size % sizeof(struct sock_filter) != 0
            || size / sizeof(struct sock_filter) > BPF_MAXINSNS) {
            errno = EINVAL;
            return -1;
        }
        fprog.len = (unsigned short)(size / sizeof(struct sock_filter));
        fprog.filter = (struct sock_filter *)prog;
        return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog);
    }
    """
    + r"""
    #include <sys/inotify.h>

    int rx_inotify_init1(int flags) { return inotify_init1(flags); }
    int rx_inotify_add_watch(int fd, const char *path, uint32_t mask) {
        return inotify_add_watch(fd, path, mask);
    }
    """,
    libraries=["seccomp"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
