/* An epoll whose target was closed after being added (its file lives on in a dup): its
 * registration cannot be re-added, so warmstart must refuse it, naming the fds. */
#include "../fixtures/zdtm.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

static void check(void) {}
static void breakit(void) {}

int main(void) {
    int efd, ep;
    SETUP((efd = eventfd(0, 0)) >= 0);
    SETUP((ep = epoll_create1(0)) >= 0);
    struct epoll_event ev = {.events = EPOLLIN};
    SETUP(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev) == 0);
    SETUP(dup(efd) >= 0);
    SETUP(close(efd) == 0);
    return serve();
}
