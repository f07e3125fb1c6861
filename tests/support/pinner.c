/*
 * A process that pins a sops-nix generation exactly the way a sandboxed virtiofsd does, so the exporter can be
 * tested against real kernel state without a VM. Its command line is whatever the test passes (a real Rust or
 * C virtiofsd command line); what it does is told by the environment, never by argv:
 *
 *   PIN_SOURCE   the shared directory as virtiofsd receives it (a symlink, a generation, the mount point)
 *   PIN_MODE     namespace: unshare the mount namespace, bind-mount the source on itself, pivot into it,
 *                           then fork the child that holds it (the Rust and C virtiofsd default)
 *                chroot:    chroot into the source
 *                none:      keep an O_PATH descriptor of the source open
 *   PIN_EXIT_MS  if set, exit after that many milliseconds (short-lived processes for race tests)
 *
 * It waits for one byte on stdin before acting (so the test can place it in a cgroup first) and writes
 * "ready\n" to stdout once the directory is pinned.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "pinner: %s: %s\n", what, strerror(errno));
    _exit(111);
}

static void hold(void) {
    const char *exit_ms = getenv("PIN_EXIT_MS");
    if (write(1, "ready\n", 6) != 6) die("write ready");
    if (exit_ms) {
        long ms = atol(exit_ms);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        _exit(0);
    }
    for (;;) pause();
}

int main(void) {
    const char *mode = getenv("PIN_MODE");
    const char *source = getenv("PIN_SOURCE");
    char go;
    if (!mode || !source) {
        fprintf(stderr, "pinner: PIN_MODE and PIN_SOURCE are required\n");
        return 2;
    }
    if (read(0, &go, 1) != 1) die("wait for go");

    if (strcmp(mode, "namespace") == 0) {
        /* As the Rust virtiofsd does: the process unshares its mount namespace and pivots into the source,
         * then forks the child that serves; parent and child share that namespace, so both mountinfo root
         * lines name the generation ("/3 /"). */
        if (unshare(CLONE_NEWNS) != 0) die("unshare");
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("make / private");
        if (mount(source, source, NULL, MS_BIND | MS_REC, NULL) != 0) die("bind source");
        if (chdir(source) != 0) die("chdir source");
        if (syscall(SYS_pivot_root, ".", ".") != 0) die("pivot_root");
        if (umount2(".", MNT_DETACH) != 0) die("detach old root");
        if (chdir("/") != 0) die("chdir /");
        pid_t child = fork();
        if (child < 0) die("fork");
        if (child > 0) {
            int status;
            while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
            return 0;
        }
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("prctl");
        hold();
    } else if (strcmp(mode, "chroot") == 0) {
        if (chdir(source) != 0) die("chdir source");
        if (chroot(".") != 0) die("chroot");
        if (chdir("/") != 0) die("chdir /");
        hold();
    } else if (strcmp(mode, "none") == 0) {
        if (open(source, O_PATH | O_DIRECTORY | O_CLOEXEC) < 0) die("open source");
        hold();
    }
    fprintf(stderr, "pinner: unknown PIN_MODE %s\n", mode);
    return 2;
}
