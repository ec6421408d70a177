/* IP sockets: a TCP listener on 127.0.0.1:0 (SO_REUSEADDR, TCP_NODELAY, SO_KEEPALIVE,
 * SO_RCVBUF, O_NONBLOCK, backlog 7) whose port goes to argv[1]/port, a UDP socket on
 * [::1]:0 with IPV6_V6ONLY, and a UDP socket connected to 127.0.0.1:9.
 * Input: `check` checks the sockets; `accept` accepts one connection (the test made it). */
#include "../fixtures/zdtm.h"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

static int tl, u6, uc;
static int port, port6, rcvbuf;

static int opt(int fd, int level, int name) {
    int v = -1;
    socklen_t l = sizeof v;
    getsockopt(fd, level, name, &v, &l);
    return v;
}

static void check(void) {
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    CHECK(getsockname(tl, (struct sockaddr *)&a, &l) == 0 && ntohs(a.sin_port) == port &&
              a.sin_addr.s_addr == htonl(INADDR_LOOPBACK),
          "listener is on port %d, expected %d", ntohs(a.sin_port), port);
    CHECK(opt(tl, SOL_SOCKET, SO_ACCEPTCONN) == 1, "not listening");
    CHECK(opt(tl, SOL_SOCKET, SO_REUSEADDR) == 1, "SO_REUSEADDR lost");
    CHECK(opt(tl, SOL_SOCKET, SO_KEEPALIVE) == 1, "SO_KEEPALIVE lost");
    CHECK(opt(tl, IPPROTO_TCP, TCP_NODELAY) == 1, "TCP_NODELAY lost");
    CHECK(opt(tl, SOL_SOCKET, SO_REUSEPORT) == 0, "SO_REUSEPORT appeared");
    CHECK(opt(tl, SOL_SOCKET, SO_RCVBUF) == rcvbuf, "SO_RCVBUF is %d, expected %d", opt(tl, SOL_SOCKET, SO_RCVBUF), rcvbuf);
    CHECK(fcntl(tl, F_GETFL) & O_NONBLOCK, "listener lost O_NONBLOCK");
    struct sockaddr_in6 a6;
    l = sizeof a6;
    CHECK(getsockname(u6, (struct sockaddr *)&a6, &l) == 0 && ntohs(a6.sin6_port) == port6 && a6.sin6_family == AF_INET6,
          "udp6 is on port %d, expected %d", ntohs(a6.sin6_port), port6);
    CHECK(opt(u6, IPPROTO_IPV6, IPV6_V6ONLY) == 1, "IPV6_V6ONLY lost");
    CHECK(opt(u6, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM, "udp6 is not SOCK_DGRAM");
    l = sizeof a;
    CHECK(getpeername(uc, (struct sockaddr *)&a, &l) == 0 && ntohs(a.sin_port) == 9, "connected udp socket lost its peer");
}

static void do_accept(void) {
    struct pollfd p = {tl, POLLIN, 0};
    CHECK(poll(&p, 1, 60000) == 1, "no connection to accept");
    int s = accept(tl, NULL, NULL);
    CHECK(s >= 0, "accept: %s", strerror(errno));
    if (s >= 0) {
        CHECK(write(s, "hi\n", 3) == 3, "write");
        close(s);
    }
}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    int one = 1;
    SETUP((tl = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0)) >= 0);
    SETUP(setsockopt(tl, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    SETUP(setsockopt(tl, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) == 0);
    SETUP(setsockopt(tl, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0);
    int rb = 50000;
    SETUP(setsockopt(tl, SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb) == 0);
    rcvbuf = opt(tl, SOL_SOCKET, SO_RCVBUF);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    SETUP(bind(tl, (struct sockaddr *)&a, sizeof a) == 0 && listen(tl, 7) == 0);
    SETUP(getsockname(tl, (struct sockaddr *)&a, &l) == 0);
    port = ntohs(a.sin_port);

    SETUP((u6 = socket(AF_INET6, SOCK_DGRAM, 0)) >= 0);
    SETUP(setsockopt(u6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) == 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    l = sizeof a6;
    SETUP(bind(u6, (struct sockaddr *)&a6, sizeof a6) == 0);
    SETUP(getsockname(u6, (struct sockaddr *)&a6, &l) == 0);
    port6 = ntohs(a6.sin6_port);

    SETUP((uc = socket(AF_INET, SOCK_DGRAM, 0)) >= 0);
    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(9), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    SETUP(connect(uc, (struct sockaddr *)&d, sizeof d) == 0);

    char path[600];
    snprintf(path, sizeof path, "%s/port", argv[1]);
    FILE *f = fopen(path, "w");
    SETUP(f && fprintf(f, "%d\n", port) > 0 && fclose(f) == 0);

    char line[256];
    int rc = 0;
    while (fgets(line, sizeof line, stdin)) {
        zdtm_failed = 0;
        zdtm_fail_buf[0] = 0;
        if (strncmp(line, "check", 5) == 0) check();
        else if (strncmp(line, "accept", 6) == 0) do_accept();
        else if (strncmp(line, "break", 5) == 0) { int z = 0; setsockopt(tl, SOL_SOCKET, SO_KEEPALIVE, &z, sizeof z); continue; }
        if (zdtm_failed) { printf("FAIL: %s\n", zdtm_fail_buf); rc = 1; }
        else printf("PASS\n");
        fflush(stdout);
    }
    return rc;
}
static void breakit(void) {}
