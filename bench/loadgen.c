/*
 * loadgen: closed-loop TCP echo load client for the muxd benchmark suite.
 *
 * N active connections each keep D messages of S bytes in flight; every echoed
 * byte is compared against what was sent (ordering included), so a server that
 * drops, duplicates or reorders data shows up as an error, not as speed.
 * Optionally I idle connections are opened first and held (never sending) to
 * measure how the server scales with connections it is not serving.
 *
 * Phases: connect idle -> [READY line, wait for "GO" on stdin] -> [--idle-echo: one
 *         verified echo on every idle connection] -> connect active -> warmup W s
 *         -> measured window T s -> drain (bounded) -> JSON line.
 *
 * --churn: connection churn instead of long-lived connections. N connectors each
 * loop connect -> send one S-byte message -> read the whole echo and verify it ->
 * close, and start the next connection at once; "msgs" are then connections that
 * completed in the window (one message each) and latency is connect() to the last
 * echoed byte. The client closes first, as a real client does (a normal close, FIN),
 * so TIME_WAIT stays on the client side. To keep those from running out of
 * ephemeral ports, and from taking the ports other programs bind on 127.0.0.1, the
 * connections come from --sources addresses 127.0.0.2, 127.0.0.3, ... (many clients,
 * as a server sees them; IP_BIND_ADDRESS_NO_PORT lets connect() pick each port by
 * the whole 4-tuple). SO_LINGER 0 would avoid TIME_WAIT too, but a reset is not how
 * clients close, and it would send the server down its error path instead of EOF.
 * --max-conns bounds the connections started (besides the time bound).
 *
 * The server's utime+stime (and utime alone) are read from /proc/PID/stat at the window
 * edges so server CPU per message is computed over the same interval as the
 * message count. Everything is bounded: an alarm() kills the run if any phase
 * hangs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A prime-ish period that never aligns with power-of-two message sizes, so a
 * server echoing the right length from the wrong offset is still caught. */
#define PATTERN_PERIOD 8209
#define RECV_CHUNK (256 * 1024)
#define MAX_EVENTS 1024
#define DRAIN_SECONDS 2.0
#define SOURCE_BASE 0x7f000002u /* 127.0.0.2: churn sources start above 127.0.0.1 */

struct conn {
    int fd;
    int want_out;       /* EPOLLOUT armed because a write was short */
    int dead;
    uint64_t pattern_base;
    uint64_t queued;    /* bytes the closed loop has asked to send */
    uint64_t written;
    uint64_t received;
    uint64_t *send_ns;  /* ring of D send timestamps, indexed by msg % D */
};

static struct {
    const char *host;
    int port;
    long conns, size, depth, idle;
    double duration, warmup, connect_timeout;
    int wait_go, batch;
    long server_pid;
    int server_core, client_core;
    int churn, sources, idle_echo;
    long max_conns, helper_pid;
} opt = {"127.0.0.1", 0, 10, 1024, 1, 0, 2.0, 0.5, 30.0, 0, 256, 0, -1, -1, 0, 16, 0, 0, 0};

static unsigned char *pattern;  /* PATTERN_PERIOD + max_chunk bytes */
static size_t max_chunk;
static unsigned char *recv_buf;

static uint64_t errors;
static char first_error[160];

static int recording;                  /* inside the measured window */
static int generating = 1;             /* queue a new message per completion */
static uint64_t total_msgs, total_bytes, verified_bytes;
static uint64_t churn_started, churn_completed, idle_echoed;
static uint32_t *lat_ns;
static size_t lat_len, lat_cap;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void note_error(const char *what, int err) {
    errors++;
    if (!first_error[0])
        snprintf(first_error, sizeof first_error, "%s: %s", what, err ? strerror(err) : "-");
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static double cpu_seconds_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* utime+stime of the whole server process (all threads), in seconds; <0 if unknown.
 * If user is not NULL it gets utime alone: a server's own (interpreter) work, as opposed
 * to the kernel's socket and epoll work done on its behalf. */
static double cpu_seconds_of(long pid, double *user) {
    if (pid <= 0) return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p) return -1;
    unsigned long utime = 0, stime = 0;
    /* after ")": state(3) ... utime is field 14, stime 15 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    double tick = (double)sysconf(_SC_CLK_TCK);
    if (user) *user = (double)utime / tick;
    return (double)(utime + stime) / tick;
}

/* Busy and total jiffies of one CPU from /proc/stat. Loopback packet delivery runs in
 * softirq context, which per-process utime/stime only partly see; the whole core's
 * busy time (user+system+irq+softirq, everything but idle/iowait) is the full cost of
 * serving when the server is the only thing pinned there. */
struct core_time { double busy, total, softirq; };

static struct core_time core_time_of(int core) {
    struct core_time t = {-1, -1, -1};
    if (core < 0) return t;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return t;
    char line[512], want[16];
    int len = snprintf(want, sizeof want, "cpu%d ", core);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, want, (size_t)len) != 0) continue;
        unsigned long long v[8] = {0};
        if (sscanf(line + len, "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
            double hz = (double)sysconf(_SC_CLK_TCK), total = 0;
            for (int i = 0; i < 8; i++) total += (double)v[i];
            t.total = total / hz;
            t.busy = (total - (double)v[3] - (double)v[4]) / hz;
            t.softirq = (double)v[6] / hz;
        }
        break;
    }
    fclose(f);
    return t;
}

static double pct(double part, double whole) {
    return whole > 0 && part >= 0 ? 100.0 * part / whole : -1;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/*
 * Open `count` connections, at most `batch` handshakes outstanding at a time so
 * the server's accept backlog is not flooded. Returns how many connected.
 */
static long connect_many(int *fds, long count, double deadline_s) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(opt.port)};
    inet_pton(AF_INET, opt.host, &addr.sin_addr);
    int cep = epoll_create1(EPOLL_CLOEXEC);
    if (cep < 0) die("epoll_create1");
    uint64_t deadline = now_ns() + (uint64_t)(deadline_s * 1e9);
    long next = 0, done = 0, ok = 0, pending = 0;
    struct epoll_event evs[MAX_EVENTS];
    while (done < count) {
        while (pending < opt.batch && next < count) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                note_error("socket", errno);
                fds[next++] = -1;
                done++;
                continue;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            fds[next] = fd;
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
                ok++, done++, next++;
                continue;
            }
            if (errno != EINPROGRESS) {
                note_error("connect", errno);
                close(fd);
                fds[next++] = -1;
                done++;
                continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)next};
            epoll_ctl(cep, EPOLL_CTL_ADD, fd, &ev);
            next++, pending++;
        }
        if (pending == 0) continue;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        int n = epoll_wait(cep, evs, MAX_EVENTS, (int)((deadline - t) / 1000000) + 1);
        for (int i = 0; i < n; i++) {
            long idx = (long)evs[i].data.u64;
            int fd = fds[idx], err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            epoll_ctl(cep, EPOLL_CTL_DEL, fd, NULL);
            pending--, done++;
            if (err) {
                note_error("connect", err);
                close(fd);
                fds[idx] = -1;
            } else {
                ok++;
            }
        }
    }
    if (done < count) {
        note_error("connect timeout", ETIMEDOUT);
        for (long i = 0; i < next; i++) /* give up on handshakes still pending */
            if (fds[i] >= 0) {
                int err = 0;
                socklen_t len = sizeof err;
                struct pollfd p = {.fd = fds[i], .events = POLLOUT};
                if (poll(&p, 1, 0) != 1 || getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &len) || err) {
                    close(fds[i]);
                    fds[i] = -1;
                }
            }
        for (long i = next; i < count; i++) fds[i] = -1;
    }
    close(cep);
    return ok;
}

static void arm(int ep, struct conn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

static void kill_conn(int ep, struct conn *c, const char *why, int err) {
    if (c->dead) return;
    note_error(why, err);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    c->dead = 1;
}

static void flush_writes(int ep, struct conn *c) {
    while (c->written < c->queued) {
        size_t off = (size_t)((c->pattern_base + c->written) % PATTERN_PERIOD);
        ssize_t n = write(c->fd, pattern + off, (size_t)(c->queued - c->written));
        if (n > 0) {
            c->written += (uint64_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            arm(ep, c, 1);
            return;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            kill_conn(ep, c, "write", errno);
            return;
        }
    }
    arm(ep, c, 0);
}

static void queue_message(struct conn *c, uint64_t t) {
    c->send_ns[(c->queued / (uint64_t)opt.size) % (uint64_t)opt.depth] = t;
    c->queued += (uint64_t)opt.size;
}

static void record_latency(uint64_t ns) {
    if (lat_len == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 1 << 20;
        lat_ns = realloc(lat_ns, lat_cap * sizeof *lat_ns);
        if (!lat_ns) die("realloc");
    }
    lat_ns[lat_len++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void on_readable(int ep, struct conn *c) {
    ssize_t n = read(c->fd, recv_buf, RECV_CHUNK);
    if (n == 0) {
        kill_conn(ep, c, "unexpected EOF from server", 0);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) kill_conn(ep, c, "read", errno);
        return;
    }
    if (c->received + (uint64_t)n > c->written) {
        kill_conn(ep, c, "server echoed more bytes than were sent", 0);
        return;
    }
    size_t off = (size_t)((c->pattern_base + c->received) % PATTERN_PERIOD);
    if (memcmp(recv_buf, pattern + off, (size_t)n) != 0) {
        kill_conn(ep, c, "echoed bytes differ from sent bytes", 0);
        return;
    }
    verified_bytes += (uint64_t)n;
    uint64_t size = (uint64_t)opt.size;
    uint64_t before = c->received / size;
    c->received += (uint64_t)n;
    uint64_t after = c->received / size;
    if (after == before) return;
    uint64_t t = now_ns();
    for (uint64_t m = before; m < after; m++) {
        if (recording) {
            record_latency(t - c->send_ns[m % (uint64_t)opt.depth]);
            total_msgs++;
            total_bytes += size;
        }
        if (generating) queue_message(c, t);
    }
    flush_writes(ep, c);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(double q) {
    if (!lat_len) return -1;
    size_t i = (size_t)(q * (double)(lat_len - 1) + 0.5);
    return lat_ns[i] / 1000.0;
}

static int wait_for_go(void) {
    printf("READY %ld\n", opt.idle);
    fflush(stdout);
    struct pollfd p = {.fd = 0, .events = POLLIN};
    if (poll(&p, 1, 300 * 1000) != 1) return -1;
    char line[64];
    return fgets(line, sizeof line, stdin) && strncmp(line, "GO", 2) == 0 ? 0 : -1;
}

/* One reading of every clock the report divides by, at a window edge. */
struct sample {
    uint64_t t;
    double client_cpu, server_cpu, server_user, helper_cpu;
    struct core_time server_core, client_core;
};

static struct sample window_start_sample, window_end_sample;
static int window_opened, window_closed;

static struct sample take_sample(uint64_t t) {
    struct sample s = {.t = t};
    s.client_cpu = cpu_seconds_self();
    s.server_cpu = cpu_seconds_of(opt.server_pid, &s.server_user);
    s.helper_cpu = cpu_seconds_of(opt.helper_pid, NULL);
    s.server_core = core_time_of(opt.server_core);
    s.client_core = core_time_of(opt.client_core);
    return s;
}

static void open_window(uint64_t t) {
    window_start_sample = take_sample(t);
    window_opened = 1;
    recording = 1;
}

/* The end of the measured window is also the end of new work: what is in flight
 * drains (verified, not counted). */
static void close_window(uint64_t t) {
    if (!window_opened) open_window(t);
    window_end_sample = take_sample(t);
    window_closed = 1;
    recording = 0;
    generating = 0;
}

/* --idle-echo: one message on every idle connection, its echo read back and verified,
 * within connect_timeout. After a restart this proves that every held connection is
 * still served, not merely open. */
static void echo_on_idle(const int *fds, long count) {
    if (count == 0) return;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    uint64_t *received = calloc((size_t)count, sizeof *received);
    if (!received) die("calloc");
    long waiting = 0;
    for (long i = 0; i < count; i++) {
        if (fds[i] < 0) continue;
        size_t off = (size_t)((uint64_t)i * 37u % PATTERN_PERIOD);
        ssize_t n = write(fds[i], pattern + off, (size_t)opt.size);
        if (n != opt.size) {
            note_error(n < 0 ? "write on an idle connection" : "short write on an idle connection",
                       n < 0 ? errno : 0);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        waiting++;
    }
    uint64_t deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while (waiting > 0) {
        uint64_t t = now_ns();
        if (t >= deadline) {
            note_error("idle echo timeout: echoes still missing", ETIMEDOUT);
            break;
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, (int)((deadline - t) / 1000000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            long i = (long)evs[e].data.u64;
            ssize_t got = read(fds[i], recv_buf, RECV_CHUNK);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            const char *bad = NULL;
            int err = 0;
            if (got < 0) bad = "read on an idle connection", err = errno;
            else if (got == 0) bad = "an idle connection was closed by the server";
            else if (received[i] + (uint64_t)got > (uint64_t)opt.size)
                bad = "server echoed more bytes than were sent";
            else if (memcmp(recv_buf, pattern + (size_t)((uint64_t)i * 37u % PATTERN_PERIOD +
                                                         received[i]), (size_t)got) != 0)
                bad = "echoed bytes differ from sent bytes";
            if (!bad) {
                verified_bytes += (uint64_t)got;
                received[i] += (uint64_t)got;
                if (received[i] < (uint64_t)opt.size) continue;
                idle_echoed++;
            } else {
                note_error(bad, err);
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
            waiting--;
        }
    }
    free(received);
    close(ep);
}

/* --- churn: connect, one message, verified echo, close, again ------------------- */

struct churner {
    int fd;               /* -1: this connector has stopped */
    int sent;             /* the message is fully written: now reading the echo */
    uint64_t started_ns;  /* connect() called */
    uint64_t base;        /* pattern offset of this connection's message */
    uint64_t written, received;
};

/* Starts the churner's next connection, unless generation has stopped or the count
 * bound is reached. Returns 1 if a connection was started. */
static int churn_start(int ep, struct churner *c) {
    c->fd = -1;
    if (!generating || (opt.max_conns && churn_started >= (uint64_t)opt.max_conns)) return 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        note_error("socket", errno);
        return 0;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt.sources > 0) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(SOURCE_BASE + (uint32_t)(churn_started % (uint64_t)opt.sources));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
            note_error("bind to a source address", errno);
            close(fd);
            return 0;
        }
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(opt.port)};
    inet_pton(AF_INET, opt.host, &addr.sin_addr);
    c->started_ns = now_ns();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0 && errno != EINPROGRESS) {
        note_error("connect", errno);
        close(fd);
        return 0;
    }
    /* Edge-triggered: one EPOLLOUT when connected, then EPOLLIN as the echo arrives;
     * no EPOLL_CTL_MOD per connection. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
    c->fd = fd;
    c->sent = 0;
    c->base = churn_started * 101u % PATTERN_PERIOD; /* each connection's bytes differ */
    c->written = c->received = 0;
    churn_started++;
    return 1;
}

/* Ends the churner's connection (a normal close: FIN) and starts its next one;
 * returns 0 if the connector stopped. */
static int churn_next(int ep, struct churner *c, const char *error, int err) {
    if (error) note_error(error, err);
    close(c->fd); /* also leaves the epoll set */
    return error ? (c->fd = -1, 0) : churn_start(ep, c);
}

static int churn_event(int ep, struct churner *c) {
    uint64_t size = (uint64_t)opt.size;
    if (!c->sent) {
        for (;;) {
            ssize_t n = write(c->fd, pattern + c->base + c->written, (size_t)(size - c->written));
            if (n > 0) {
                c->written += (uint64_t)n;
                if (c->written == size) break;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && errno == EAGAIN) {
                return 1; /* still connecting, or a full send buffer: the next edge */
            } else {
                return churn_next(ep, c, "connect or write", errno);
            }
        }
        c->sent = 1;
        /* No echo can be here yet; its arrival is a new EPOLLIN edge. */
        return 1;
    }
    for (;;) {
        ssize_t n = read(c->fd, recv_buf, RECV_CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 1;
        if (n < 0) return churn_next(ep, c, "read", errno);
        if (n == 0) return churn_next(ep, c, "EOF from server before the whole echo", 0);
        if (c->received + (uint64_t)n > size)
            return churn_next(ep, c, "server echoed more bytes than were sent", 0);
        if (memcmp(recv_buf, pattern + c->base + c->received, (size_t)n) != 0)
            return churn_next(ep, c, "echoed bytes differ from sent bytes", 0);
        verified_bytes += (uint64_t)n;
        c->received += (uint64_t)n;
        if (c->received == size) break;
    }
    churn_completed++;
    if (recording) {
        record_latency(now_ns() - c->started_ns);
        total_msgs++;
        total_bytes += size;
    }
    return churn_next(ep, c, NULL, 0);
}

static void run_churn(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct churner *churners = calloc((size_t)opt.conns + 1, sizeof *churners);
    if (!churners) die("calloc");
    long live = 0;
    for (long i = 0; i < opt.conns; i++) live += churn_start(ep, &churners[i]);
    uint64_t t0 = now_ns();
    uint64_t window_start = t0 + (uint64_t)(opt.warmup * 1e9);
    uint64_t window_end = window_start + (uint64_t)(opt.duration * 1e9);
    uint64_t drain_end = window_end + (uint64_t)(DRAIN_SECONDS * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while (live > 0) {
        uint64_t t = now_ns();
        if (!window_opened && t >= window_start) open_window(t);
        if (!window_closed && t >= window_end) {
            close_window(t);
            drain_end = t + (uint64_t)(DRAIN_SECONDS * 1e9);
        }
        if (window_closed && t >= drain_end) {
            note_error("drain timeout: connections still open", 0);
            break;
        }
        uint64_t next = !window_opened ? window_start : !window_closed ? window_end : drain_end;
        int timeout_ms = next > t ? (int)((next - t) / 1000000) + 1 : 0;
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct churner *c = evs[i].data.ptr;
            if (c->fd >= 0 && !churn_event(ep, c)) live--;
        }
    }
    /* The count bound (or failures) ended the run before the time bound did. */
    if (!window_closed) close_window(now_ns());
    for (long i = 0; i < opt.conns; i++)
        if (churners[i].fd >= 0) close(churners[i].fd);
    free(churners);
    close(ep);
}

/* --- long-lived connections, D messages in flight each -------------------------- */

static void run_closed_loop(const int *fds) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct conn *conns = calloc((size_t)opt.conns + 1, sizeof *conns);
    uint64_t *ring = calloc((size_t)(opt.conns * opt.depth) + 1, sizeof(uint64_t));
    uint64_t t0 = now_ns();
    long live = 0;
    for (long i = 0; i < opt.conns; i++) {
        if (fds[i] < 0) continue;
        struct conn *c = &conns[live++];
        c->fd = fds[i];
        c->pattern_base = (uint64_t)i * 101u; /* streams differ per connection */
        c->send_ns = ring + i * opt.depth;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        for (long d = 0; d < opt.depth; d++) queue_message(c, t0);
        flush_writes(ep, c);
    }

    uint64_t window_start = t0 + (uint64_t)(opt.warmup * 1e9);
    uint64_t window_end = window_start + (uint64_t)(opt.duration * 1e9);
    uint64_t drain_end = window_end + (uint64_t)(DRAIN_SECONDS * 1e9);
    struct epoll_event evs[MAX_EVENTS];

    for (;;) {
        uint64_t t = now_ns();
        if (!window_opened && t >= window_start) open_window(t);
        if (!window_closed && t >= window_end) close_window(t);
        if (!generating) {
            int inflight = 0;
            for (long i = 0; i < live && !inflight; i++)
                inflight = !conns[i].dead && conns[i].received < conns[i].queued;
            if (!inflight || t >= drain_end) {
                if (inflight) note_error("drain timeout: messages still in flight", 0);
                break;
            }
        }
        if (live == 0) {
            if (!window_opened) open_window(t);
            if (!window_closed) close_window(t);
            break;
        }
        uint64_t next = recording ? window_end : generating ? window_start : drain_end;
        int timeout_ms = next > t ? (int)((next - t) / 1000000) + 1 : 0;
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->dead) continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(ep, c);
            if (!c->dead && (evs[i].events & EPOLLOUT)) flush_writes(ep, c);
        }
    }
    for (long i = 0; i < live; i++) close(conns[i].fd);
    close(ep);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host H] [--conns N] [--size S] [--depth D]\n"
            "               [--duration T] [--warmup W] [--idle I] [--wait-go] [--idle-echo]\n"
            "               [--server-pid PID] [--helper-pid PID] [--connect-timeout S]\n"
            "               [--batch B] [--server-core C] [--client-core C]\n"
            "               [--churn [--sources K] [--max-conns M]]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},       {"conns", 1, 0, 'n'},
        {"size", 1, 0, 's'},     {"depth", 1, 0, 'd'},      {"duration", 1, 0, 't'},
        {"warmup", 1, 0, 'w'},   {"idle", 1, 0, 'i'},       {"wait-go", 0, 0, 'g'},
        {"server-pid", 1, 0, 'P'}, {"connect-timeout", 1, 0, 'c'}, {"batch", 1, 0, 'b'},
        {"server-core", 1, 0, 'S'}, {"client-core", 1, 0, 'C'},
        {"churn", 0, 0, 'x'},    {"sources", 1, 0, 'k'},    {"max-conns", 1, 0, 'm'},
        {"helper-pid", 1, 0, 'H'}, {"idle-echo", 0, 0, 'e'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'n': opt.conns = atol(optarg); break;
        case 's': opt.size = atol(optarg); break;
        case 'd': opt.depth = atol(optarg); break;
        case 't': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'i': opt.idle = atol(optarg); break;
        case 'g': opt.wait_go = 1; break;
        case 'P': opt.server_pid = atol(optarg); break;
        case 'c': opt.connect_timeout = atof(optarg); break;
        case 'b': opt.batch = atoi(optarg); break;
        case 'S': opt.server_core = atoi(optarg); break;
        case 'C': opt.client_core = atoi(optarg); break;
        case 'x': opt.churn = 1; break;
        case 'k': opt.sources = atoi(optarg); break;
        case 'm': opt.max_conns = atol(optarg); break;
        case 'H': opt.helper_pid = atol(optarg); break;
        case 'e': opt.idle_echo = 1; break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns < 0 || opt.size < 1 || opt.depth < 1 || opt.idle < 0 ||
        opt.duration < 0 || opt.duration > 600 || opt.warmup < 0 || opt.batch < 1 ||
        opt.sources < 0 || opt.sources > 250 || opt.max_conns < 0 ||
        (opt.churn && (opt.depth != 1 || opt.size > RECV_CHUNK)))
        usage();
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_nofile();
    /* Hard stop: no phase may hang the benchmark runner. */
    alarm((unsigned)(3 * opt.connect_timeout + opt.warmup + opt.duration + DRAIN_SECONDS + 30 +
                     (opt.wait_go ? 300 : 0)));

    max_chunk = (size_t)(opt.size * opt.depth);
    if (max_chunk < RECV_CHUNK) max_chunk = RECV_CHUNK;
    pattern = malloc(PATTERN_PERIOD + max_chunk);
    recv_buf = malloc(RECV_CHUNK);
    if (!pattern || !recv_buf) die("malloc");
    for (size_t i = 0; i < PATTERN_PERIOD + max_chunk; i++)
        pattern[i] = (unsigned char)((i % PATTERN_PERIOD) * 131u + 7u);

    int *idle_fds = calloc((size_t)opt.idle + 1, sizeof(int));
    long idle_ok = connect_many(idle_fds, opt.idle, opt.connect_timeout);
    if (opt.wait_go && wait_for_go() != 0) note_error("no GO from runner", 0);
    if (opt.idle_echo) echo_on_idle(idle_fds, opt.idle);

    long active_ok = 0;
    if (opt.churn) {
        run_churn();
        active_ok = opt.conns;
    } else {
        int *fds = calloc((size_t)opt.conns + 1, sizeof(int));
        active_ok = connect_many(fds, opt.conns, opt.connect_timeout);
        run_closed_loop(fds);
    }

    /* Idle sockets never carried data: reset them instead of leaving thousands of
     * TIME_WAIT entries behind after every memory run. */
    struct linger abortive = {.l_onoff = 1, .l_linger = 0};
    for (long i = 0; i < opt.idle; i++)
        if (idle_fds[i] >= 0) {
            setsockopt(idle_fds[i], SOL_SOCKET, SO_LINGER, &abortive, sizeof abortive);
            close(idle_fds[i]);
        }

    struct sample *w0 = &window_start_sample, *w1 = &window_end_sample;
    double secs = (double)(w1->t - w0->t) / 1e9;
    if (secs <= 0) secs = 1e-9;
    qsort(lat_ns, lat_len, sizeof *lat_ns, cmp_u32);
    double client_cpu = w1->client_cpu - w0->client_cpu;
    double server_cpu = w0->server_cpu >= 0 && w1->server_cpu >= 0 ? w1->server_cpu - w0->server_cpu : -1;
    double helper_cpu = w0->helper_cpu >= 0 && w1->helper_cpu >= 0 ? w1->helper_cpu - w0->helper_cpu : -1;
    int have_cores = w0->server_core.total >= 0 && w1->server_core.total >= 0 &&
                     w0->client_core.total >= 0 && w1->client_core.total >= 0;
    double server_core_busy = have_cores ? w1->server_core.busy - w0->server_core.busy : -1;
    double server_core_total = have_cores ? w1->server_core.total - w0->server_core.total : -1;
    double server_core_softirq = have_cores ? w1->server_core.softirq - w0->server_core.softirq : -1;
    double client_core_busy = have_cores ? w1->client_core.busy - w0->client_core.busy : -1;
    double client_core_total = have_cores ? w1->client_core.total - w0->client_core.total : -1;
    double per_msg = total_msgs ? 1e6 / (double)total_msgs : -1.0;
    printf("{\"conns\": %ld, \"conns_connected\": %ld, \"size\": %ld, \"depth\": %ld, "
           "\"idle\": %ld, \"idle_connected\": %ld, \"idle_echoed\": %llu, \"seconds\": %.6f, "
           "\"msgs\": %llu, \"bytes\": %llu, \"msgs_per_s\": %.1f, \"mib_per_s\": %.3f, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"max_us\": %.2f, \"client_cpu_s\": %.4f, \"client_cpu_pct\": %.1f, "
           "\"server_cpu_s\": %.4f, \"server_cpu_pct\": %.1f, \"server_cpu_us_per_msg\": %.4f, "
           "\"server_user_us_per_msg\": %.4f, "
           "\"helper_cpu_s\": %.4f, \"helper_cpu_pct\": %.1f, \"helper_cpu_us_per_msg\": %.4f, "
           "\"server_core_busy_pct\": %.1f, \"server_core_softirq_pct\": %.1f, "
           "\"server_core_us_per_msg\": %.4f, \"client_core_busy_pct\": %.1f, "
           "\"churn\": %d, \"sources\": %d, \"churn_started\": %llu, \"churn_completed\": %llu, "
           "\"verified_bytes\": %llu, \"errors\": %llu, \"first_error\": \"%s\"}\n",
           opt.conns, active_ok, opt.size, opt.depth, opt.idle, idle_ok,
           (unsigned long long)idle_echoed, secs,
           (unsigned long long)total_msgs, (unsigned long long)total_bytes,
           (double)total_msgs / secs, (double)total_bytes / secs / (1024.0 * 1024.0),
           percentile_us(0.50), percentile_us(0.90), percentile_us(0.99), percentile_us(0.999),
           lat_len ? lat_ns[lat_len - 1] / 1000.0 : -1.0, client_cpu, 100.0 * client_cpu / secs,
           server_cpu, server_cpu >= 0 ? 100.0 * server_cpu / secs : -1.0,
           server_cpu >= 0 && total_msgs ? server_cpu * per_msg : -1.0,
           server_cpu >= 0 && total_msgs ? (w1->server_user - w0->server_user) * per_msg : -1.0,
           helper_cpu, helper_cpu >= 0 ? 100.0 * helper_cpu / secs : -1.0,
           helper_cpu >= 0 && total_msgs ? helper_cpu * per_msg : -1.0,
           pct(server_core_busy, server_core_total), pct(server_core_softirq, server_core_total),
           have_cores && total_msgs ? server_core_busy * per_msg : -1.0,
           pct(client_core_busy, client_core_total), opt.churn, opt.churn ? opt.sources : 0,
           (unsigned long long)churn_started, (unsigned long long)churn_completed,
           (unsigned long long)verified_bytes, (unsigned long long)errors, first_error);
    return errors ? 1 : 0;
}
