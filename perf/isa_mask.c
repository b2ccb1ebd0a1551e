// LD_PRELOAD library: this process sees a CPU without the ISA extensions named in TIDAL_HIDE_ISA
// (comma-separated groups: "avx512", "vnni"), through CPUID (MLAS's and tidal's kernel dispatch) and through
// /proc/cpuinfo (tidal.backends.hardware), so both pick what they would pick on such a host. Only the
// instruction set is emulated: the core underneath keeps its own execution units and timings.
//
// How: CPUID faulting (Linux arch_prctl(ARCH_SET_CPUID, 0), "cpuid_fault" in /proc/cpuinfo) turns every CPUID
// into SIGSEGV in this thread and the threads it creates. The handler runs the real CPUID with faulting off
// for that moment, clears the hidden bits and steps over the instruction. A SIGSEGV handler the program
// installs (Python's faulthandler, Node's and V8's) through sigaction() or signal() is kept aside by the
// interposed ones and gets every other SIGSEGV, as the kernel would deliver it; without one, the default
// action. (sigset(), bsd_signal() and raw syscalls are not interposed.) The program's handler sees the real
// CPU through CPUID; a thread that blocks SIGSEGV itself and then runs CPUID is killed, as the kernel treats a
// blocked fault. execve resets faulting; the constructor re-arms it in
// children that inherit LD_PRELOAD.
//
// Build: cc -O2 -shared -fPIC -o isa_mask.so isa_mask.c -ldl   (perf/bench_int8.py --hide-isa does this)
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

enum { EAX, EBX, ECX, EDX };

struct hidden_bits {
    unsigned leaf, subleaf, reg;
    uint32_t bits;
};

#define B(n) (1u << (n))
// CPUID.(EAX=7): AVX-512 foundation and its extensions (Intel SDM vol. 2A, CPUID leaf 07H).
static const struct hidden_bits kAvx512[] = {
    {7, 0, EBX, B(16) | B(17) | B(21) | B(26) | B(27) | B(28) | B(30) | B(31)},  // F DQ IFMA PF ER CD BW VL
    {7, 0, ECX, B(1) | B(6) | B(11) | B(12) | B(14)},  // VBMI VBMI2 VNNI BITALG VPOPCNTDQ
    {7, 0, EDX, B(2) | B(3) | B(8) | B(23)},           // 4VNNIW 4FMAPS VP2INTERSECT FP16
    {7, 1, EAX, B(5)},                                 // BF16
};
// Every int8 dot-product extension: AVX512_VNNI, AVX512_4VNNIW, AVX-VNNI, AVX-VNNI-INT8, AVX-VNNI-INT16, and
// AMX (BF16, TILE, INT8), which MLAS prefers where present.
static const struct hidden_bits kVnni[] = {
    {7, 0, ECX, B(11)}, {7, 0, EDX, B(2) | B(22) | B(24) | B(25)}, {7, 1, EAX, B(4)}, {7, 1, EDX, B(4) | B(10)},
};
#undef B

static uint32_t g_mask[2][4];  // [subleaf][register] of leaf 7
static int g_hide_avx512, g_hide_vnni;
static char* g_cpuinfo;  // /proc/cpuinfo with the hidden flags removed
static size_t g_cpuinfo_len;

static struct sigaction g_program;  // the program's own SIGSEGV disposition, which it believes installed
static int g_armed;
static int (*g_sigaction)(int, const struct sigaction*, struct sigaction*);

static void add(const struct hidden_bits* h, size_t n) {
    for (size_t i = 0; i < n; ++i) g_mask[h[i].subleaf][h[i].reg] |= h[i].bits;
}

// Any SIGSEGV but a faulted CPUID goes where the kernel would have sent it: to the program's handler, run
// with the program's signal mask (SIGSEGV blocked too unless SA_NODEFER) and reset first under SA_RESETHAND;
// without one, to the default action (a fault recurs once it is in place; a sent signal is sent again).
static void chain(int sig, siginfo_t* info, void* context) {
    const struct sigaction program = g_program;
    // sa_handler and sa_sigaction share storage: SIG_IGN and SIG_DFL read the same through either.
    const int has_handler = program.sa_handler != SIG_IGN && program.sa_handler != SIG_DFL;
    if (!has_handler) {
        if (program.sa_handler == SIG_IGN && info->si_code <= 0) return;  // sent, and ignored by the program
        g_sigaction(sig, &program, NULL);  // an ignored fault is fatal as well: the kernel forces the default
        if (info->si_code <= 0) raise(sig);
        return;
    }
    if (program.sa_flags & SA_RESETHAND) {
        memset(&g_program, 0, sizeof g_program);
        g_program.sa_handler = SIG_DFL;
    }
    sigset_t mask = program.sa_mask, before;
    if (!(program.sa_flags & SA_NODEFER)) sigaddset(&mask, sig);
    sigprocmask(SIG_BLOCK, &mask, &before);
    // With SIGSEGV blocked, a CPUID the handler runs (crash reporters read the CPU) would fault into a blocked
    // signal, which the kernel makes fatal: CPUID runs unmasked in this thread for the handler's duration.
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    if (program.sa_flags & SA_SIGINFO) {
        program.sa_sigaction(sig, info, context);
    } else {
        program.sa_handler(sig);
    }
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    sigprocmask(SIG_SETMASK, &before, NULL);
}

static void on_segv(int sig, siginfo_t* info, void* context) {
    greg_t* r = ((ucontext_t*)context)->uc_mcontext.gregs;
    const unsigned char* ip = (const unsigned char*)r[REG_RIP];
    // A faulted CPUID is a general protection fault (SI_KERNEL); only then is RIP known to be readable code.
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        chain(sig, info, context);
        return;
    }
    const int saved = errno;
    const unsigned leaf = (unsigned)r[REG_RAX], subleaf = (unsigned)r[REG_RCX];
    unsigned v[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, subleaf, v[EAX], v[EBX], v[ECX], v[EDX]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && subleaf < 2)
        for (int i = 0; i < 4; ++i) v[i] &= ~g_mask[subleaf][i];
    // CPUID writes the low 32 bits and zeroes the upper half of each register.
    r[REG_RAX] = v[EAX];
    r[REG_RBX] = v[EBX];
    r[REG_RCX] = v[ECX];
    r[REG_RDX] = v[EDX];
    r[REG_RIP] += 2;
    errno = saved;
}

static int hidden_flag(const char* flag, size_t n) {
    return (g_hide_avx512 && n >= 6 && strncmp(flag, "avx512", 6) == 0) ||
           (g_hide_vnni && (memmem(flag, n, "vnni", 4) != NULL || (n >= 4 && strncmp(flag, "amx_", 4) == 0)));
}

// Copies the "flags" lines of /proc/cpuinfo without the hidden flags, every other line as it is.
static void filter_cpuinfo(const char* in, size_t len) {
    g_cpuinfo = malloc(len + 1);
    char* out = g_cpuinfo;
    for (const char* line = in; line < in + len;) {
        const char* end = memchr(line, '\n', (size_t)(in + len - line));
        end = end ? end + 1 : in + len;
        const char* colon = memchr(line, ':', (size_t)(end - line));
        if (strncmp(line, "flags", 5) != 0 || colon == NULL) {
            memcpy(out, line, (size_t)(end - line));
            out += end - line;
        } else {
            memcpy(out, line, (size_t)(colon + 1 - line));
            out += colon + 1 - line;
            for (const char* p = colon + 1; p < end;) {
                while (p < end && (*p == ' ' || *p == '\n')) ++p;
                const char* q = p;
                while (q < end && *q != ' ' && *q != '\n') ++q;
                if (q > p && !hidden_flag(p, (size_t)(q - p))) {
                    *out++ = ' ';
                    memcpy(out, p, (size_t)(q - p));
                    out += q - p;
                }
                p = q;
            }
            *out++ = '\n';
        }
        line = end;
    }
    g_cpuinfo_len = (size_t)(out - g_cpuinfo);
}

static void read_cpuinfo(void) {
    const int fd = (int)syscall(SYS_openat, AT_FDCWD, "/proc/cpuinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    size_t cap = 1 << 16, len = 0;
    char* buf = malloc(cap);
    for (ssize_t got; (got = read(fd, buf + len, cap - len)) > 0;) {
        len += (size_t)got;
        if (len == cap) buf = realloc(buf, cap *= 2);
    }
    close(fd);
    filter_cpuinfo(buf, len);
    free(buf);
}

static int is_cpuinfo(const char* path) {
    return g_cpuinfo != NULL && path != NULL && strcmp(path, "/proc/cpuinfo") == 0;
}

// A fresh in-memory file with the filtered text, for each open of /proc/cpuinfo; -1 with errno set when one
// cannot be made (the open fails as an open can, rather than showing the unfiltered flags).
static int cpuinfo_fd(int flags) {
    const int fd = memfd_create("cpuinfo", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (fd < 0) return -1;
    if (write(fd, g_cpuinfo, g_cpuinfo_len) != (ssize_t)g_cpuinfo_len || lseek(fd, 0, SEEK_SET) != 0) {
        const int error = errno ? errno : EIO;
        close(fd);
        errno = error;
        return -1;
    }
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

int openat(int dirfd, const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    const mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    if (is_cpuinfo(path)) return cpuinfo_fd(flags);
    static int (*real)(int, const char*, int, ...);
    if (real == NULL) real = (int (*)(int, const char*, int, ...))dlsym(RTLD_NEXT, "openat");
    return real(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char* path, int flags, ...) __attribute__((alias("openat")));

int open(const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    const mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return openat(AT_FDCWD, path, flags, mode);
}

int open64(const char* path, int flags, ...) __attribute__((alias("open")));

FILE* fopen(const char* path, const char* how) {
    if (is_cpuinfo(path)) {
        const int fd = cpuinfo_fd(O_CLOEXEC);
        return fd < 0 ? NULL : fdopen(fd, "r");
    }
    static FILE* (*real)(const char*, const char*);
    if (real == NULL) real = (FILE * (*)(const char*, const char*)) dlsym(RTLD_NEXT, "fopen");
    return real(path, how);
}

FILE* fopen64(const char* path, const char* how) __attribute__((alias("fopen")));

// The program's SIGSEGV handler goes to g_program, and this library's stays installed; other signals pass.
int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
    if (g_sigaction == NULL)
        g_sigaction = (int (*)(int, const struct sigaction*, struct sigaction*))dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !g_armed) return g_sigaction(sig, act, old);
    struct sigaction wanted;  // read before `old` is written: the two may be one struct
    if (act != NULL) wanted = *act;
    if (old != NULL) *old = g_program;
    if (act != NULL) g_program = wanted;
    return 0;
}

// glibc's signal() installs through an internal sigaction that the one above does not see. For SIGSEGV once
// armed it is emulated with glibc's (BSD) semantics, SA_RESTART and the signal masked in its handler; any
// other call goes to glibc's own.
sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real)(int, sighandler_t);
    if (real == NULL) real = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    if (sig != SIGSEGV || !g_armed) return real(sig, handler);
    if (handler == SIG_ERR) {
        errno = EINVAL;
        return SIG_ERR;
    }
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, sig);
    return sigaction(sig, &sa, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void arm(void) {
    const char* groups = getenv("TIDAL_HIDE_ISA");
    if (groups == NULL || *groups == '\0') return;
    char* copy = strdup(groups);
    for (char *save, *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
        if (strcmp(g, "avx512") == 0) {
            g_hide_avx512 = 1;
            add(kAvx512, sizeof kAvx512 / sizeof *kAvx512);
        } else if (strcmp(g, "vnni") == 0) {
            g_hide_vnni = 1;
            add(kVnni, sizeof kVnni / sizeof *kVnni);
        } else {
            fprintf(stderr, "isa_mask: unknown group '%s' in TIDAL_HIDE_ISA (avx512, vnni)\n", g);
            _exit(2);
        }
    }
    free(copy);
    read_cpuinfo();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    // On the thread's alternate stack where it has one (faulthandler's, for a stack overflow), and not masked
    // while it runs: a fault in the program's handler it calls is delivered, not fatal.
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (g_sigaction == NULL)
        g_sigaction = (int (*)(int, const struct sigaction*, struct sigaction*))dlsym(RTLD_NEXT, "sigaction");
    if (g_sigaction(SIGSEGV, &sa, &g_program) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("isa_mask: CPUID faulting unavailable (needs 'cpuid_fault' in /proc/cpuinfo)");
        _exit(2);
    }
    g_armed = 1;
}
