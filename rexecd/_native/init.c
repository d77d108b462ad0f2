/*
 * rexec-init: PID 1 of every rexecd container.
 *
 * It is not a Python interpreter: the spawner execs it from a sealed memfd, so no
 * file of the host and no interpreter stays reachable from inside the container.
 * It forks the container's command, forwards termination signals to it, reaps
 * every orphan re-parented to it, and exits with the command's status
 * (128 + signal when the command was killed by a signal).
 *
 * It makes itself non-dumpable first: execve made it dumpable again, and a dumpable
 * pid 1 can be ptrace-attached by any process of the container with its uid (a stopped
 * init reaps nothing, so the container runs out of pids) and its /proc/1/fd, environ
 * and mem opened. Non-dumpable, only CAP_SYS_PTRACE (which containers never have) can.
 *
 * Usage: rexec-init PROGRAM [ARG...]   (PROGRAM is looked up in PATH when it has no '/')
 *        rexec-init                     idle: reap orphans until SIGTERM/SIGINT, then pass
 *                                       the signal to every process of the container and
 *                                       exit once none is left (the runtime's stop timeout
 *                                       kills stragglers through the cgroup)
 *        argv[0] "rexec-exec": PATH ARGV0 [ARG...]
 *                                       exec mode, for a process entering a running
 *                                       container: exec PATH at once, as ARGV0 ARG...
 *
 * Exec mode exists for CVE-2019-5736: the spawner's child is the host's Python, and
 * were it to exec the container's program itself, a program that is /proc/self/exe
 * (a symlink to it, or a #! script naming it) would make the kernel run the host's
 * interpreter inside the container, reachable through /proc/PID/exe. Passing through
 * this sealed memfd first, /proc/self/exe is rexec-init whenever the kernel resolves
 * a program of the container.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t child_pid = 0;
static volatile sig_atomic_t stopping = 0;

static void forward(int sig) {
    if (child_pid > 0)
        kill(child_pid, sig);
}

static void stop_all(int sig) {
    stopping = 1;
    kill(-1, sig); /* every process of the pid namespace except init */
}

static void noop(int sig) { (void)sig; }

static int idle(void) {
    struct sigaction sa;
    sigset_t blocked, none;
    /* Signals stay blocked except inside sigsuspend, so none can slip in between the
     * check of `stopping` and the wait. */
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGCHLD);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = stop_all;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = noop;
    sigaction(SIGCHLD, &sa, NULL);
    sigemptyset(&none);
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (stopping) {
            /* No child left does not mean empty: exec'd processes are not our children. */
            if (kill(-1, 0) < 0 && errno == ESRCH)
                return 0;
            usleep(20000);
            continue;
        }
        sigsuspend(&none);
    }
}

int main(int argc, char **argv) {
    static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
    sigset_t all, old;
    struct sigaction sa;
    pid_t pid;
    int status = 0, code = 0;
    size_t i;

    if (argc >= 3 && strcmp(argv[0], "rexec-exec") == 0) {
        execv(argv[1], argv + 2);
        /* The same words the runtime uses when it finds no program to run. */
        fprintf(stderr, "exec %s: %s\n", argv[2], strerror(errno));
        return errno == ENOENT ? 127 : 126;
    }
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
        perror("rexec-init: prctl(PR_SET_DUMPABLE)");
        return 127;
    }
    if (argc < 2)
        return idle();
    /* Block signals across fork so the handlers cannot run before child_pid is set. */
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaction(forwarded[i], &sa, NULL);

    pid = fork();
    if (pid < 0) {
        perror("rexec-init: fork");
        return 127;
    }
    if (pid == 0) {
        /* The command starts with default dispositions and the caller's signal mask. */
        sa.sa_handler = SIG_DFL;
        for (i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
            sigaction(forwarded[i], &sa, NULL);
        sigprocmask(SIG_SETMASK, &old, NULL);
        /* Own process group, so a terminal's Ctrl-C reaches the command, not init. */
        setpgid(0, 0);
        execvp(argv[1], argv + 1);
        fprintf(stderr, "rexec-init: exec %s: %s\n", argv[1], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    child_pid = pid;
    sigprocmask(SIG_SETMASK, &old, NULL);

    for (;;) {
        pid_t got = waitpid(-1, &status, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: nothing left */
        }
        if (got == pid) {
            code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            child_pid = 0;
            /* Orphans of the command die with the pid namespace when init exits. */
            return code;
        }
    }
    return code;
}
