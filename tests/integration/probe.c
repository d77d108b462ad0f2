/*
 * isolation probe: the few syscalls busybox has no applet for, compiled statically by
 * tests/integration/test_tenant_isolation.py and run inside (or, for keyring-exec,
 * in front of) a container. Each command prints one line and exits 0 when the call
 * succeeded, 1 when it failed ("<what>: <errno name>").
 *
 *   probe ptrace PID                    PTRACE_ATTACH, then PTRACE_SEIZE; detaches cleanly
 *   probe key-add DESC DATA             a "user" key in the session keyring; prints its id
 *   probe key-hold DESC DATA            key-add, then sleeps holding the session keyring
 *   probe key-read ID                   prints the key's payload
 *   probe key-update ID DATA            overwrites the key's payload
 *   probe key-search DESC               looks the key up from the session keyring
 *   probe keyring-exec FILE DESC DATA CMD...
 *                                       a fresh session keyring holding DESC=DATA (its id
 *                                       written to FILE), then exec CMD in it
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/keyctl.h>

static long keyctl(long cmd, long a, long b, long c, long d) {
    return syscall(SYS_keyctl, cmd, a, b, c, d);
}

static long add_key(const char *desc, const char *data) {
    return syscall(SYS_add_key, "user", desc, data, strlen(data), KEY_SPEC_SESSION_KEYRING);
}

static int fail(const char *what) {
    printf("%s: %s\n", what, strerrorname_np(errno));
    return 1;
}

static int trace(pid_t pid) {
    int status, ok = 0;
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) == 0) {
        /* The attach stops the tracee: wait for that stop and let it go unchanged. */
        waitpid(pid, &status, __WALL);
        ptrace(PTRACE_DETACH, pid, 0, 0);
        printf("attach: ok\n");
        ok = 1;
    } else {
        printf("attach: %s\n", strerrorname_np(errno));
    }
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0) {
        ptrace(PTRACE_DETACH, pid, 0, 0);
        printf("seize: ok\n");
        ok = 1;
    } else {
        printf("seize: %s\n", strerrorname_np(errno));
    }
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    char buf[4096];
    long n;
    if (argc >= 3 && strcmp(argv[1], "ptrace") == 0)
        return trace(atoi(argv[2]));
    if (argc >= 4 && (strcmp(argv[1], "key-add") == 0 || strcmp(argv[1], "key-hold") == 0)) {
        n = add_key(argv[2], argv[3]);
        if (n < 0)
            return fail("add_key");
        printf("%ld\n", n);
        fflush(stdout);
        if (argv[1][4] == 'h')
            for (;;)
                pause();
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "key-read") == 0) {
        n = keyctl(KEYCTL_READ, atol(argv[2]), (long)buf, sizeof buf - 1, 0);
        if (n < 0)
            return fail("read");
        buf[n < (long)sizeof buf - 1 ? n : (long)sizeof buf - 1] = 0;
        printf("payload: %s\n", buf);
        return 0;
    }
    if (argc >= 4 && strcmp(argv[1], "key-update") == 0) {
        if (keyctl(KEYCTL_UPDATE, atol(argv[2]), (long)argv[3], strlen(argv[3]), 0) < 0)
            return fail("update");
        printf("update: ok\n");
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "key-search") == 0) {
        n = keyctl(KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, (long)"user", (long)argv[2], 0);
        if (n < 0)
            return fail("search");
        printf("found: %ld\n", n);
        return 0;
    }
    if (argc >= 6 && strcmp(argv[1], "keyring-exec") == 0) {
        FILE *f;
        if (keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0, 0, 0, 0) < 0)
            return fail("join");
        n = add_key(argv[3], argv[4]);
        if (n < 0)
            return fail("add_key");
        f = fopen(argv[2], "w");
        if (f == NULL || fprintf(f, "%ld\n", n) < 0 || fclose(f) != 0)
            return fail("write id");
        execvp(argv[5], argv + 5);
        return fail("exec");
    }
    fprintf(stderr, "usage: see the comment at the top of probe.c\n");
    return 2;
}
