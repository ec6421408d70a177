/* A sealed memfd (20000 patterned bytes, offset 100, F_SEAL_GROW|F_SEAL_SHRINK) and a
 * deleted file (offset 3, mode 0640) in the directory given as argv[1]. */
#include "../fixtures/zdtm.h"

#define SIZE 20000
static int mfd, ghost;
static char pattern[SIZE];
static char dir[512];

static void check(void) {
    char buf[SIZE], link[600], want[600];
    CHECK(lseek(mfd, 0, SEEK_CUR) == 100, "memfd offset is %ld", (long)lseek(mfd, 0, SEEK_CUR));
    CHECK(pread(mfd, buf, SIZE, 0) == SIZE && memcmp(buf, pattern, SIZE) == 0, "memfd contents differ");
    int seals = fcntl(mfd, F_GET_SEALS);
    CHECK(seals == (F_SEAL_GROW | F_SEAL_SHRINK), "memfd seals are %#x", seals);
    CHECK(ftruncate(mfd, SIZE * 2) < 0 && errno == EPERM, "memfd could grow");
    snprintf(want, sizeof want, "/memfd:ws-test (deleted)");
    snprintf(buf, sizeof buf, "/proc/self/fd/%d", mfd);
    ssize_t n = readlink(buf, link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    CHECK(strcmp(link, want) == 0, "memfd is %s", link);

    CHECK(lseek(ghost, 0, SEEK_CUR) == 3, "ghost offset is %ld", (long)lseek(ghost, 0, SEEK_CUR));
    n = pread(ghost, buf, sizeof buf, 0);
    CHECK(n == 11 && memcmp(buf, "ghost bytes", 11) == 0, "ghost holds %zd bytes", n);
    struct stat st;
    CHECK(fstat(ghost, &st) == 0 && st.st_nlink == 0 && (st.st_mode & 0777) == 0640, "ghost nlink %ld mode %o", (long)st.st_nlink, st.st_mode & 0777);
    snprintf(buf, sizeof buf, "/proc/self/fd/%d", ghost);
    n = readlink(buf, link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    CHECK(strncmp(link, dir, strlen(dir)) == 0, "ghost is %s, not in %s", link, dir);
    int fl = fcntl(ghost, F_GETFL);
    CHECK((fl & O_ACCMODE) == O_RDONLY, "ghost is not read-only (flags %#o)", fl);
}

static void breakit(void) {
    lseek(mfd, 0, SEEK_SET);
}

int main(int argc, char **argv) {
    SETUP(argc == 2);
    snprintf(dir, sizeof dir, "%s", argv[1]);
    for (int i = 0; i < SIZE; i++) pattern[i] = (char)(i * 7 + i / 300);
    SETUP((mfd = memfd_create("ws-test", MFD_ALLOW_SEALING)) >= 0);
    SETUP(write(mfd, pattern, SIZE) == SIZE);
    SETUP(fcntl(mfd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) == 0);
    SETUP(lseek(mfd, 100, SEEK_SET) == 100);
    char path[600];
    snprintf(path, sizeof path, "%s/ghost", dir);
    int w = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0640);
    SETUP(w >= 0 && write(w, "ghost bytes", 11) == 11);
    SETUP(fchmod(w, 0640) == 0);
    SETUP((ghost = open(path, O_RDONLY)) >= 0);
    close(w);
    SETUP(unlink(path) == 0);
    SETUP(lseek(ghost, 3, SEEK_SET) == 3);
    return serve();
}
