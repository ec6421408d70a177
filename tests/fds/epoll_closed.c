/* An epoll whose target was closed after being added while its file lives on in a dup:
 * the kernel keeps the registration under the closed number. A second registration
 * (of a pipe) is closed too and its number reused by another file. After restore
 * both registrations are there under their numbers (fdinfo `tfd:`), report events through
 * the dups, and both numbers still hold the file that took them. */
#include "../fixtures/zdtm.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

static int ep, efd_dup, pipe_w, reused, n1, n2;

/* Whether the epoll's fdinfo lists a registration under number `tfd`. */
static int registered(int tfd) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", ep);
    FILE *f = fopen(path, "r");
    int found = 0, n;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "tfd: %d", &n) == 1 && n == tfd) found = 1;
    if (f) fclose(f);
    return found;
}

static void check(void) {
    CHECK(registered(n1), "no registration under fd %d", n1);
    CHECK(registered(n2), "no registration under fd %d", n2);
    struct stat st;
    CHECK(fstat(n1, &st) == 0 && S_ISCHR(st.st_mode), "fd %d is not /dev/null any more", n1);
    CHECK(fstat(n2, &st) == 0 && S_ISCHR(st.st_mode), "fd %d is not /dev/null any more", n2);
    uint64_t one = 1;
    CHECK(write(efd_dup, &one, 8) == 8, "write to the eventfd dup: %s", strerror(errno));
    CHECK(write(pipe_w, "p", 1) == 1, "write to the pipe: %s", strerror(errno));
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 0), got = 0;
    for (int i = 0; i < n; i++) got |= ev[i].data.u64 == 33 ? 1 : ev[i].data.u64 == 55 ? 2 : 4;
    CHECK(got == 3, "epoll_wait reported %d events (mask %d), expected the eventfd's and the pipe's", n, got);
    /* Re-arm: drain both. */
    uint64_t v;
    char c;
    CHECK(read(efd_dup, &v, 8) == 8 && read(reused, &c, 1) == 1, "draining: %s", strerror(errno));
}

/* The eventfd's last fd goes: its registration goes with its file. */
static void breakit(void) { close(efd_dup); }

int main(void) {
    int p[2], null;
    SETUP((n1 = eventfd(0, 0)) >= 0);
    SETUP((ep = epoll_create1(0)) >= 0);
    SETUP(pipe(p) == 0);
    n2 = p[0];
    pipe_w = p[1];
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 33};
    SETUP(epoll_ctl(ep, EPOLL_CTL_ADD, n1, &ev) == 0);
    ev.data.u64 = 55;
    SETUP(epoll_ctl(ep, EPOLL_CTL_ADD, n2, &ev) == 0);
    SETUP((efd_dup = dup(n1)) >= 0);
    SETUP((reused = dup(n2)) >= 0);
    /* Both numbers now hold another file. */
    SETUP((null = open("/dev/null", O_RDONLY)) >= 0);
    SETUP(dup2(null, n1) == n1 && dup2(null, n2) == n2 && close(null) == 0);
    return serve();
}
