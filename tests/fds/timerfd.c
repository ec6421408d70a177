/* timerfds: a periodic one (first expiry in 1000 s, then every 500 s, CLOCK_MONOTONIC,
 * O_NONBLOCK) and one that already expired once (its tick unread). */
#include "../fixtures/zdtm.h"
#include <poll.h>
#include <sys/timerfd.h>

static int periodic, fired;
static int fired_read;

static void check(void) {
    struct itimerspec its;
    CHECK(timerfd_gettime(periodic, &its) == 0, "timerfd_gettime: %s", strerror(errno));
    CHECK(its.it_interval.tv_sec == 500 && its.it_interval.tv_nsec == 0, "interval is %ld.%09ld", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
    CHECK(its.it_value.tv_sec > 900 && its.it_value.tv_sec <= 1000, "remaining %ld s, expected ~1000", (long)its.it_value.tv_sec);
    int fl = fcntl(periodic, F_GETFL);
    CHECK(fl >= 0 && (fl & O_NONBLOCK), "periodic timer lost O_NONBLOCK");
    uint64_t n = 0;
    CHECK(read(periodic, &n, 8) < 0 && errno == EAGAIN, "periodic timer should not have fired");
    char line[256], want[64];
    FILE *f = fopen("/proc/self/fdinfo/3", "r");
    int clock_ok = 0;
    snprintf(want, sizeof want, "clockid: %d\n", CLOCK_MONOTONIC);
    while (f && fgets(line, sizeof line, f)) if (strcmp(line, want) == 0) clock_ok = 1;
    if (f) fclose(f);
    CHECK(clock_ok, "fd 3 is not on CLOCK_MONOTONIC");
    if (!fired_read) {
        CHECK(read(fired, &n, 8) == 8 && n == 1, "expired timer should have 1 unread tick (got %llu)", (unsigned long long)n);
        fired_read = 1;
    }
}

static void breakit(void) {
    struct itimerspec its = {{0, 0}, {0, 0}};
    timerfd_settime(periodic, 0, &its, NULL);
}

int main(void) {
    SETUP((periodic = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK)) == 3);
    struct itimerspec its = {{500, 0}, {1000, 0}};
    SETUP(timerfd_settime(periodic, 0, &its, NULL) == 0);
    SETUP((fired = timerfd_create(CLOCK_REALTIME, 0)) >= 0);
    struct itimerspec once = {{0, 0}, {0, 1000}};
    SETUP(timerfd_settime(fired, 0, &once, NULL) == 0);
    struct pollfd pf = {fired, POLLIN, 0};
    SETUP(poll(&pf, 1, 60000) == 1);
    return serve();
}
