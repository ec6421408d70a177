/* An io_uring instance: warmstart must refuse it by name. */
#include "../fixtures/zdtm.h"
#include <linux/io_uring.h>
#include <sys/syscall.h>

static void check(void) {}
static void breakit(void) {}

int main(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    SETUP(syscall(SYS_io_uring_setup, 4, &p) >= 0);
    return serve();
}
