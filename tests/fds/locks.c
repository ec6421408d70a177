/* Locks: flock(LOCK_EX) on argv[1]/a and a POSIX write lock on bytes 10..19 of
 * argv[1]/b. `check` forks a child that must find both held by its parent. */
#include "../fixtures/zdtm.h"
#include <sys/file.h>
#include <sys/wait.h>

static int fa, fb;
static char a[600], b[600];

static void check(void) {
    pid_t pid = fork();
    if (pid == 0) {
        int x = open(a, O_RDWR);
        if (x < 0 || flock(x, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK) _exit(1);
        int y = open(b, O_RDWR);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        if (y < 0 || fcntl(y, F_GETLK, &fl) < 0) _exit(2);
        if (fl.l_type != F_WRLCK || fl.l_start != 10 || fl.l_len != 10 || fl.l_pid != getppid()) _exit(3);
        _exit(0);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid, "fork/wait: %s", strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "child found %s", WEXITSTATUS(st) == 1 ? "no flock on a" : WEXITSTATUS(st) == 3 ? "no POSIX lock on b[10..19]" : "an error");
}

static void breakit(void) {
    flock(fa, LOCK_UN);
}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    snprintf(a, sizeof a, "%s/a", argv[1]);
    snprintf(b, sizeof b, "%s/b", argv[1]);
    SETUP((fa = open(a, O_CREAT | O_RDWR, 0600)) >= 0);
    SETUP((fb = open(b, O_CREAT | O_RDWR, 0600)) >= 0);
    SETUP(write(fb, "0123456789abcdefghijklmnop", 26) == 26);
    SETUP(flock(fa, LOCK_EX) == 0);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 10};
    SETUP(fcntl(fb, F_SETLK, &fl) == 0);
    return serve();
}
