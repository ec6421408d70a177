/* A signalfd for SIGUSR1 and SIGUSR2 (O_NONBLOCK), both blocked. */
#include "../fixtures/zdtm.h"
#include <signal.h>
#include <sys/signalfd.h>

static int sfd;

static void check(void) {
    struct signalfd_siginfo si;
    int fl = fcntl(sfd, F_GETFL);
    CHECK(fl >= 0 && (fl & O_NONBLOCK), "signalfd lost O_NONBLOCK");
    CHECK(read(sfd, &si, sizeof si) < 0 && errno == EAGAIN, "nothing should be pending");
    raise(SIGUSR2);
    CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2, "did not read SIGUSR2 from the signalfd");
    raise(SIGUSR1);
    CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1, "did not read SIGUSR1 from the signalfd");
}

static void breakit(void) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    signalfd(sfd, &m, 0);
}

int main(void) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGUSR2);
    SETUP(sigprocmask(SIG_BLOCK, &m, NULL) == 0);
    SETUP((sfd = signalfd(-1, &m, SFD_NONBLOCK)) >= 0);
    return serve();
}
