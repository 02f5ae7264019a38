/* Counts executed guest instructions; a QEMU TCG plugin for plugin API v1 (QEMU 7.2).
 * Optional arguments lo=ADDR and hi=ADDR (decimal or 0x hex: -plugin insn.so,lo=0x..,hi=0x..)
 * count only the instructions whose vaddr is in [lo, hi).
 * Optional pcs=PATH also counts each instruction address below 2 MiB (a Cortex-M image's
 * flash) and writes "ADDR COUNT" lines (hex, decimal) for the executed ones to PATH at exit:
 * the input of benches/qemu-insn/profile.py (scripts/profile-m4.sh).
 * Prints "insns: N" through qemu_plugin_outs at exit (shown with -d plugin; -D FILE to log).
 * Built without QEMU headers: the few v1 entry points used are declared here. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                           void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn,
                                                enum qemu_plugin_op op, void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *),
                                    void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t count, lo, hi = UINT64_MAX;
/* pcs=: one counter per halfword address below PCS_SPAN bytes. */
#define PCS_SPAN (2u << 20)
static uint64_t *per_pc;
static const char *pcs_path;

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    uint64_t n = 0;
    size_t total = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < total; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        n += pc >= lo && pc < hi;
        if (per_pc && pc < PCS_SPAN)
            qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64,
                                                       &per_pc[pc / 2], 1);
    }
    /* Added each time the block runs (a block is left early only by a fault). */
    if (n) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &count, n);
}

static void at_exit(qemu_plugin_id_t id, void *p) {
    (void)id, (void)p;
    char line[64];
    snprintf(line, sizeof line, "insns: %" PRIu64 "\n", count);
    qemu_plugin_outs(line);
    if (per_pc) {
        FILE *f = fopen(pcs_path, "w");
        if (!f) {
            qemu_plugin_outs("insn.so: cannot write the pcs= file\n");
            return;
        }
        for (size_t i = 0; i < PCS_SPAN / 2; i++)
            if (per_pc[i]) fprintf(f, "%zx %" PRIu64 "\n", 2 * i, per_pc[i]);
        fclose(f);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const void *info, int argc,
                                                               char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "lo=", 3)) lo = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "hi=", 3)) hi = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "pcs=", 4)) pcs_path = argv[i] + 4;
        else { fprintf(stderr, "insn.so: unknown argument %s (lo=ADDR, hi=ADDR, pcs=PATH)\n", argv[i]); return -1; }
    }
    if (pcs_path && !(per_pc = calloc(PCS_SPAN / 2, sizeof *per_pc))) {
        fprintf(stderr, "insn.so: out of memory for pcs=\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
