/* An epoll on an eventfd (level) and a pipe's read end (edge, with data), and a second
 * epoll that contains the first (nesting). */
#include "../fixtures/zdtm.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

static int ep, outer, efd, p[2];

static void check(void) {
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 0);
    int seen_e = 0, seen_p = 0;
    for (int i = 0; i < n; i++) {
        if (ev[i].data.u64 == 0x1234567890abcdefULL && (ev[i].events & EPOLLIN)) seen_e = 1;
        else if (ev[i].data.u64 == 42 && (ev[i].events & EPOLLIN)) seen_p = 1;
        else failf("unexpected event %#x data %#llx", ev[i].events, (unsigned long long)ev[i].data.u64);
    }
    CHECK(n == 2 && seen_e && seen_p, "epoll_wait gave %d events (eventfd %d, pipe %d)", n, seen_e, seen_p);
    n = epoll_wait(outer, ev, 4, 0);
    CHECK(n == 1 && ev[0].data.u32 == 7, "outer epoll gave %d events", n);
    /* the pipe is edge-triggered: no new event until new data */
    n = epoll_wait(ep, ev, 4, 0);
    CHECK(n == 1 && ev[0].data.u64 == 0x1234567890abcdefULL, "second wait gave %d events (edge-triggered pipe must not repeat)", n);
    char c;
    CHECK(read(p[0], &c, 1) == 1 && c == 'x', "pipe lost its byte");
    CHECK(write(p[1], "x", 1) == 1, "write");
}

static void breakit(void) {
    epoll_ctl(ep, EPOLL_CTL_DEL, efd, NULL);
}

int main(void) {
    struct epoll_event ev;
    SETUP((efd = eventfd(1, 0)) >= 0);
    SETUP(pipe(p) == 0);
    /* the outer epoll gets the lower fd: restore must still create the inner one first */
    SETUP((outer = epoll_create1(EPOLL_CLOEXEC)) >= 0);
    SETUP((ep = epoll_create1(0)) >= 0);
    ev.events = EPOLLIN;
    ev.data.u64 = 0x1234567890abcdefULL;
    SETUP(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev) == 0);
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = 42;
    SETUP(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) == 0);
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    ev.data.u32 = 7;
    SETUP(epoll_ctl(outer, EPOLL_CTL_ADD, ep, &ev) == 0);
    SETUP(write(p[1], "x", 1) == 1);
    return serve();
}
