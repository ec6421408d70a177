/* An established TCP connection to itself (both ends in the process) over 127.0.0.1.
 * `check`: data goes through both ways. `reset` (after a restore with --tcp-close):
 * the client end reads ECONNRESET (or EOF) and cannot write. */
#include "../fixtures/zdtm.h"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

static int cl, sv;

static void check(void) {
    char b[8] = {0};
    CHECK(write(cl, "ping", 4) == 4 && read(sv, b, 4) == 4 && memcmp(b, "ping", 4) == 0, "client->server failed");
    CHECK(write(sv, "pong", 4) == 4 && read(cl, b, 4) == 4 && memcmp(b, "pong", 4) == 0, "server->client failed");
}

static void reset(void) {
    char b[8];
    ssize_t n = read(cl, b, sizeof b);
    CHECK((n < 0 && errno == ECONNRESET) || n == 0, "client read gave %zd (%s), expected ECONNRESET", n, n < 0 ? strerror(errno) : "data");
    n = write(cl, "x", 1);
    CHECK(n < 0 && (errno == EPIPE || errno == ECONNRESET), "client write gave %zd", n);
}

static void breakit(void) {}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    int l;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    SETUP((l = socket(AF_INET, SOCK_STREAM, 0)) >= 0);
    SETUP(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 1) == 0);
    SETUP(getsockname(l, (struct sockaddr *)&a, &len) == 0);
    SETUP((cl = socket(AF_INET, SOCK_STREAM, 0)) >= 0);
    SETUP(connect(cl, (struct sockaddr *)&a, sizeof a) == 0);
    SETUP((sv = accept(l, NULL, NULL)) >= 0);
    close(l);
    char line[256];
    int rc = 0;
    while (fgets(line, sizeof line, stdin)) {
        zdtm_failed = 0;
        zdtm_fail_buf[0] = 0;
        if (strncmp(line, "check", 5) == 0) check();
        else if (strncmp(line, "reset", 5) == 0) reset();
        if (zdtm_failed) { printf("FAIL: %s\n", zdtm_fail_buf); rc = 1; }
        else printf("PASS\n");
        fflush(stdout);
    }
    return rc;
}
