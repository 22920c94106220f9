/*
 * loadgen: closed-loop TCP echo load client for the muxd benchmark suite.
 *
 * N active connections each keep D messages of S bytes in flight; every echoed
 * byte is compared against what was sent (ordering included), so a server that
 * drops, duplicates or reorders data shows up as an error, not as speed.
 * Optionally I idle connections are opened first and held (never sending) to
 * measure how the server scales with connections it is not serving.
 *
 * Phases: connect idle -> [READY line, wait for "GO" on stdin] -> connect active
 *         -> warmup W s -> measured window T s -> drain (bounded) -> JSON line.
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
} opt = {"127.0.0.1", 0, 10, 1024, 1, 0, 2.0, 0.5, 30.0, 0, 256, 0, -1, -1};

static unsigned char *pattern;  /* PATTERN_PERIOD + max_chunk bytes */
static size_t max_chunk;
static unsigned char *recv_buf;

static uint64_t errors;
static char first_error[160];

static int recording;                  /* inside the measured window */
static int generating = 1;             /* queue a new message per completion */
static uint64_t total_msgs, total_bytes, verified_bytes;
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

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host H] [--conns N] [--size S] [--depth D]\n"
            "               [--duration T] [--warmup W] [--idle I] [--wait-go]\n"
            "               [--server-pid PID] [--connect-timeout S] [--batch B]\n"
            "               [--server-core C] [--client-core C]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},       {"conns", 1, 0, 'n'},
        {"size", 1, 0, 's'},     {"depth", 1, 0, 'd'},      {"duration", 1, 0, 't'},
        {"warmup", 1, 0, 'w'},   {"idle", 1, 0, 'i'},       {"wait-go", 0, 0, 'g'},
        {"server-pid", 1, 0, 'P'}, {"connect-timeout", 1, 0, 'c'}, {"batch", 1, 0, 'b'},
        {"server-core", 1, 0, 'S'}, {"client-core", 1, 0, 'C'},
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
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns < 0 || opt.size < 1 || opt.depth < 1 || opt.idle < 0 ||
        opt.duration < 0 || opt.duration > 600 || opt.warmup < 0 || opt.batch < 1)
        usage();
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_nofile();
    /* Hard stop: no phase may hang the benchmark runner. */
    alarm((unsigned)(2 * opt.connect_timeout + opt.warmup + opt.duration + DRAIN_SECONDS + 30 +
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

    int *fds = calloc((size_t)opt.conns + 1, sizeof(int));
    long active_ok = connect_many(fds, opt.conns, opt.connect_timeout);

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
    double client_cpu0 = 0, server_cpu0 = -1, client_cpu1 = 0, server_cpu1 = -1;
    double server_user0 = 0, server_user1 = 0;
    struct core_time server_core0 = {-1, -1, -1}, server_core1 = server_core0;
    struct core_time client_core0 = server_core0, client_core1 = server_core0;
    uint64_t measured_start = 0, measured_end = 0;
    struct epoll_event evs[MAX_EVENTS];

    for (;;) {
        uint64_t t = now_ns();
        if (!recording && generating && t >= window_start) {
            recording = 1;
            measured_start = t;
            client_cpu0 = cpu_seconds_self();
            server_cpu0 = cpu_seconds_of(opt.server_pid, &server_user0);
            server_core0 = core_time_of(opt.server_core);
            client_core0 = core_time_of(opt.client_core);
        }
        if (recording && t >= window_end) {
            measured_end = t;
            client_cpu1 = cpu_seconds_self();
            server_cpu1 = cpu_seconds_of(opt.server_pid, &server_user1);
            server_core1 = core_time_of(opt.server_core);
            client_core1 = core_time_of(opt.client_core);
            recording = 0;
            generating = 0;
        }
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
            if (!measured_end) {
                measured_start = measured_end = t;
                generating = 0;
            }
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
    /* Idle sockets never carried data: reset them instead of leaving thousands of
     * TIME_WAIT entries behind after every memory run. */
    struct linger abortive = {.l_onoff = 1, .l_linger = 0};
    for (long i = 0; i < opt.idle; i++)
        if (idle_fds[i] >= 0) {
            setsockopt(idle_fds[i], SOL_SOCKET, SO_LINGER, &abortive, sizeof abortive);
            close(idle_fds[i]);
        }

    double secs = (double)(measured_end - measured_start) / 1e9;
    if (secs <= 0) secs = 1e-9;
    qsort(lat_ns, lat_len, sizeof *lat_ns, cmp_u32);
    double client_cpu = client_cpu1 - client_cpu0;
    double server_cpu = server_cpu0 >= 0 && server_cpu1 >= 0 ? server_cpu1 - server_cpu0 : -1;
    int have_cores = server_core0.total >= 0 && server_core1.total >= 0 &&
                     client_core0.total >= 0 && client_core1.total >= 0;
    double server_core_busy = have_cores ? server_core1.busy - server_core0.busy : -1;
    double server_core_total = have_cores ? server_core1.total - server_core0.total : -1;
    double server_core_softirq = have_cores ? server_core1.softirq - server_core0.softirq : -1;
    double client_core_busy = have_cores ? client_core1.busy - client_core0.busy : -1;
    double client_core_total = have_cores ? client_core1.total - client_core0.total : -1;
    printf("{\"conns\": %ld, \"conns_connected\": %ld, \"size\": %ld, \"depth\": %ld, "
           "\"idle\": %ld, \"idle_connected\": %ld, \"seconds\": %.6f, \"msgs\": %llu, "
           "\"bytes\": %llu, \"msgs_per_s\": %.1f, \"mib_per_s\": %.3f, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"max_us\": %.2f, \"client_cpu_s\": %.4f, \"client_cpu_pct\": %.1f, "
           "\"server_cpu_s\": %.4f, \"server_cpu_pct\": %.1f, \"server_cpu_us_per_msg\": %.4f, "
           "\"server_user_us_per_msg\": %.4f, "
           "\"server_core_busy_pct\": %.1f, \"server_core_softirq_pct\": %.1f, "
           "\"server_core_us_per_msg\": %.4f, \"client_core_busy_pct\": %.1f, "
           "\"verified_bytes\": %llu, \"errors\": %llu, \"first_error\": \"%s\"}\n",
           opt.conns, active_ok, opt.size, opt.depth, opt.idle, idle_ok, secs,
           (unsigned long long)total_msgs, (unsigned long long)total_bytes,
           (double)total_msgs / secs, (double)total_bytes / secs / (1024.0 * 1024.0),
           percentile_us(0.50), percentile_us(0.90), percentile_us(0.99), percentile_us(0.999),
           lat_len ? lat_ns[lat_len - 1] / 1000.0 : -1.0, client_cpu, 100.0 * client_cpu / secs,
           server_cpu, server_cpu >= 0 ? 100.0 * server_cpu / secs : -1.0,
           server_cpu >= 0 && total_msgs ? server_cpu * 1e6 / (double)total_msgs : -1.0,
           server_cpu >= 0 && total_msgs ? (server_user1 - server_user0) * 1e6 / (double)total_msgs
                                         : -1.0,
           pct(server_core_busy, server_core_total), pct(server_core_softirq, server_core_total),
           have_cores && total_msgs ? server_core_busy * 1e6 / (double)total_msgs : -1.0,
           pct(client_core_busy, client_core_total), (unsigned long long)verified_bytes, (unsigned long long)errors, first_error);
    return errors ? 1 : 0;
}
