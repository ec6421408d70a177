/* eventfds: one counting (5, O_NONBLOCK), one semaphore (3). */
#include "../fixtures/zdtm.h"
#include <sys/eventfd.h>

static int cnt, sem;

static void check(void) {
    uint64_t v = 0;
    int fl = fcntl(cnt, F_GETFL);
    CHECK(fl >= 0 && (fl & O_NONBLOCK), "counting eventfd lost O_NONBLOCK");
    CHECK(read(cnt, &v, 8) == 8 && v == 5, "counting eventfd read %llu, expected 5", (unsigned long long)v);
    CHECK(read(cnt, &v, 8) < 0 && errno == EAGAIN, "counting eventfd should be empty now");
    v = 5;
    CHECK(write(cnt, &v, 8) == 8, "write: %s", strerror(errno));
    for (int i = 0; i < 3; i++) {
        v = 0;
        CHECK(read(sem, &v, 8) == 8 && v == 1, "semaphore read %d gave %llu, expected 1", i, (unsigned long long)v);
    }
    fl = fcntl(sem, F_GETFL);
    fcntl(sem, F_SETFL, fl | O_NONBLOCK);
    CHECK(read(sem, &v, 8) < 0 && errno == EAGAIN, "semaphore should be at 0 after 3 reads");
    fcntl(sem, F_SETFL, fl);
    v = 3;
    CHECK(write(sem, &v, 8) == 8, "write: %s", strerror(errno));
}

static void breakit(void) {
    uint64_t v = 1;
    if (write(cnt, &v, 8) != 8) perror("write");
}

int main(void) {
    SETUP((cnt = eventfd(5, EFD_NONBLOCK)) >= 0);
    SETUP((sem = eventfd(3, EFD_SEMAPHORE)) >= 0);
    return serve();
}
