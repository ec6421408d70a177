/* A bound NETLINK_ROUTE socket and an unbound NETLINK_GENERIC one. `check` asks the
 * route socket for the links and expects an RTM_NEWLINK answer. */
#include "../fixtures/zdtm.h"
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>

static int rt, gen;

static void check(void) {
    int proto = -1;
    socklen_t l = sizeof proto;
    CHECK(getsockopt(rt, SOL_SOCKET, SO_PROTOCOL, &proto, &l) == 0 && proto == NETLINK_ROUTE, "route socket has protocol %d", proto);
    l = sizeof proto;
    CHECK(getsockopt(gen, SOL_SOCKET, SO_PROTOCOL, &proto, &l) == 0 && proto == NETLINK_GENERIC, "generic socket has protocol %d", proto);
    struct {
        struct nlmsghdr h;
        struct rtgenmsg g;
    } req = {{sizeof req, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0}, {AF_UNSPEC}};
    CHECK(send(rt, &req, sizeof req, 0) == sizeof req, "send: %s", strerror(errno));
    static char buf[65536];
    ssize_t n = recv(rt, buf, sizeof buf, 0);
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    CHECK(n >= (ssize_t)sizeof *h && h->nlmsg_type == RTM_NEWLINK, "no RTM_NEWLINK answer (%zd bytes, type %d)", n, n > 0 ? h->nlmsg_type : -1);
    /* drain the rest of the dump */
    while (n > 0) {
        int done = 0;
        for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n))
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) done = 1;
        if (done) break;
        n = recv(rt, buf, sizeof buf, 0);
    }
}

static void breakit(void) {
    close(rt);
}

int main(void) {
    SETUP((rt = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)) >= 0);
    struct sockaddr_nl a = {.nl_family = AF_NETLINK};
    SETUP(bind(rt, (struct sockaddr *)&a, sizeof a) == 0);
    SETUP((gen = socket(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC)) >= 0);
    return serve();
}
