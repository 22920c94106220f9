/*
 * Minimal single-threaded epoll echo server: the practical ceiling for one core.
 *
 * Level-triggered; reads up to 64 KiB, writes it straight back, and only when
 * the peer's window is full keeps the remainder and stops reading that
 * connection until it drains (so memory stays bounded without a ring buffer).
 *
 * usage: epoll_echo PORT   (binds 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536

struct pending {
    char *data;
    size_t len, off;
};

static struct pending *pending; /* indexed by fd */
static char buf[BUF_SIZE];

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    free(pending[fd].data);
    memset(&pending[fd], 0, sizeof pending[fd]);
    close(fd);
}

static void set_interest(int ep, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

/* Returns 0 if everything was written, 1 if some is left, -1 on error. */
static int write_out(int fd, const char *data, size_t len, size_t *written) {
    while (*written < len) {
        ssize_t n = write(fd, data + *written, len - *written);
        if (n > 0) *written += (size_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && errno == EAGAIN) return 1;
        else return -1;
    }
    return 0;
}

static void on_readable(int ep, int fd) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        drop(ep, fd);
        return;
    }
    if (n < 0) return;
    size_t written = 0;
    int rc = write_out(fd, buf, (size_t)n, &written);
    if (rc < 0) {
        drop(ep, fd);
    } else if (rc > 0) {
        struct pending *p = &pending[fd];
        p->len = (size_t)n - written;
        p->off = 0;
        p->data = malloc(p->len);
        memcpy(p->data, buf + written, p->len);
        set_interest(ep, fd, EPOLLOUT);
    }
}

static void on_writable(int ep, int fd) {
    struct pending *p = &pending[fd];
    int rc = write_out(fd, p->data, p->len, &p->off);
    if (rc < 0) {
        drop(ep, fd);
    } else if (rc == 0) {
        free(p->data);
        memset(p, 0, sizeof *p);
        set_interest(ep, fd, EPOLLIN);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    pending = calloc(rl.rlim_cur, sizeof *pending);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 4096)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

    struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if ((rlim_t)c >= rl.rlim_cur) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
            } else if (evs[i].events & EPOLLOUT) {
                on_writable(ep, fd);
            } else {
                on_readable(ep, fd);
            }
        }
    }
}
