/* A unix stream socket connected to a listener outside the process (argv[1]): warmstart
 * must refuse it, naming the fd. */
#include "../fixtures/zdtm.h"
#include <sys/socket.h>
#include <sys/un.h>

static void check(void) {}
static void breakit(void) {}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    int c;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
    SETUP((c = socket(AF_UNIX, SOCK_STREAM, 0)) >= 0);
    SETUP(connect(c, (struct sockaddr *)&a, sizeof a) == 0);
    return serve();
}
