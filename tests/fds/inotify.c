/* inotify watching argv[1] (IN_CREATE, wd 1) and argv[1]/b (wd 3; wd 2 was removed). */
#include "../fixtures/zdtm.h"
#include <sys/inotify.h>

static int in;
static char dir[400];
static int n_created;

static void check(void) {
    char path[600], b2[600];
    snprintf(path, sizeof path, "%s/new%d", dir, n_created++);
    int f = open(path, O_CREAT | O_WRONLY, 0600);
    CHECK(f >= 0, "creating %s: %s", path, strerror(errno));
    close(f);
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n = read(in, buf, sizeof buf);
    struct inotify_event *e = (struct inotify_event *)buf;
    CHECK(n >= (ssize_t)sizeof *e && e->wd == 1 && (e->mask & IN_CREATE), "no IN_CREATE event on wd 1 (read %zd)", n);
    snprintf(b2, sizeof b2, "%s/b", dir);
    int wd = inotify_add_watch(in, b2, IN_MODIFY | IN_MASK_ADD);
    CHECK(wd == 3, "the watch on b has wd %d, expected 3", wd);
}

static void breakit(void) {
    inotify_rm_watch(in, 1);
}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    snprintf(dir, sizeof dir, "%s", argv[1]);
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    int f;
    SETUP((f = open(a, O_CREAT | O_WRONLY, 0600)) >= 0 && close(f) == 0);
    SETUP((f = open(b, O_CREAT | O_WRONLY, 0600)) >= 0 && close(f) == 0);
    SETUP((in = inotify_init1(0)) >= 0);
    SETUP(inotify_add_watch(in, dir, IN_CREATE) == 1);
    SETUP(inotify_add_watch(in, a, IN_MODIFY) == 2);
    SETUP(inotify_rm_watch(in, 2) == 0);
    char buf[4096];
    SETUP(read(in, buf, sizeof buf) > 0); /* the IN_IGNORED of wd 2 */
    SETUP(inotify_add_watch(in, b, IN_MODIFY) == 3);
    return serve();
}
