/* Unix sockets: a stream socketpair with bytes queued both ways, a datagram socketpair
 * with two queued messages (O_NONBLOCK end), a listening stream socket on a path in
 * argv[1] and one on an abstract name. */
#include "../fixtures/zdtm.h"
#include <sys/socket.h>
#include <stddef.h>
#include <sys/un.h>

static int st[2], dg[2], lpath, labstr;
static char path[200], abname[64];

static int connect_to(struct sockaddr_un *a, socklen_t len) {
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)a, len) < 0) return -1;
    return c;
}

static void check_listener(int l, struct sockaddr_un *a, socklen_t len, const char *what) {
    int c = connect_to(a, len);
    CHECK(c >= 0, "connect to %s: %s", what, strerror(errno));
    if (c < 0) return;
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0, "accept on %s: %s", what, strerror(errno));
    char b[4] = {0};
    CHECK(write(c, "hey", 3) == 3 && s >= 0 && read(s, b, 3) == 3 && strcmp(b, "hey") == 0, "%s: no data through", what);
    close(c);
    if (s >= 0) close(s);
}

static void check(void) {
    char b[64];
    ssize_t n = recv(st[0], b, sizeof b, MSG_DONTWAIT);
    CHECK(n == 10 && memcmp(b, "to-end-0!!", 10) == 0, "stream end 0 read %zd bytes", n);
    n = recv(st[1], b, sizeof b, MSG_DONTWAIT);
    CHECK(n == 6 && memcmp(b, "to-1!!", 6) == 0, "stream end 1 read %zd bytes", n);
    CHECK(write(st[1], "to-end-0!!", 10) == 10 && write(st[0], "to-1!!", 6) == 6, "stream write");
    n = recv(dg[0], b, sizeof b, 0);
    CHECK(n == 5 && memcmp(b, "first", 5) == 0, "dgram 1: %zd bytes", n);
    n = recv(dg[0], b, sizeof b, 0);
    CHECK(n == 6 && memcmp(b, "second", 6) == 0, "dgram 2: %zd bytes", n);
    n = recv(dg[0], b, sizeof b, 0);
    CHECK(n < 0 && errno == EAGAIN, "dgram queue should be empty");
    CHECK(send(dg[1], "first", 5, 0) == 5 && send(dg[1], "second", 6, 0) == 6, "dgram send");
    int type = 0;
    socklen_t tl = sizeof type;
    getsockopt(dg[0], SOL_SOCKET, SO_TYPE, &type, &tl);
    CHECK(type == SOCK_DGRAM, "dgram pair has type %d", type);

    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    check_listener(lpath, &a, sizeof a, path);
    struct sockaddr_un ab = {.sun_family = AF_UNIX};
    memcpy(ab.sun_path + 1, abname, strlen(abname));
    check_listener(labstr, &ab, offsetof(struct sockaddr_un, sun_path) + 1 + strlen(abname), "abstract socket");
}

static void breakit(void) {
    char b[4];
    recv(st[0], b, 2, 0);
}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    SETUP(socketpair(AF_UNIX, SOCK_STREAM, 0, st) == 0);
    SETUP(write(st[1], "to-end-0", 8) == 8 && write(st[1], "!!", 2) == 2);
    SETUP(write(st[0], "to-1!!", 6) == 6);
    SETUP(socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) == 0);
    SETUP(fcntl(dg[0], F_SETFL, O_NONBLOCK) == 0);
    SETUP(send(dg[1], "first", 5, 0) == 5 && send(dg[1], "second", 6, 0) == 6);

    snprintf(path, sizeof path, "%s/sock", argv[1]);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    SETUP((lpath = socket(AF_UNIX, SOCK_STREAM, 0)) >= 0);
    SETUP(bind(lpath, (struct sockaddr *)&a, sizeof a) == 0 && listen(lpath, 5) == 0);

    const char *base = strrchr(argv[1], '/');
    snprintf(abname, sizeof abname, "ws-test-%s", base ? base + 1 : argv[1]);
    struct sockaddr_un ab = {.sun_family = AF_UNIX};
    memcpy(ab.sun_path + 1, abname, strlen(abname));
    SETUP((labstr = socket(AF_UNIX, SOCK_STREAM, 0)) >= 0);
    SETUP(bind(labstr, (struct sockaddr *)&ab, offsetof(struct sockaddr_un, sun_path) + 1 + strlen(abname)) == 0);
    SETUP(listen(labstr, 5) == 0);
    return serve();
}
