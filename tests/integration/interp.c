/*
 * interp: a stand-in ELF interpreter (PT_INTERP) without libc, for the CVE-2019-5736
 * test. When the kernel runs a dynamically linked program through it, it prints what
 * /proc/self/exe is (the program the kernel was asked to run) and exits: the test
 * installs it where the host's Python looks for its loader, so that a container's
 * attempt to run the runtime's own binary shows instead of failing for want of libc.
 * x86_64 only (raw syscalls).
 */
static long sys3(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

void _start(void) {
    static const char prefix[] = "interp exe=";
    char buf[512];
    long n = sys3(89 /* readlink */, (long)"/proc/self/exe", (long)buf, sizeof buf - 1);
    sys3(1 /* write */, 1, (long)prefix, sizeof prefix - 1);
    if (n > 0)
        sys3(1, 1, (long)buf, n);
    sys3(1, 1, (long)"\n", 1);
    sys3(231 /* exit_group */, 0, 0, 0);
    for (;;)
        ;
}
