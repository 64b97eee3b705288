/*
 * QEMU TCG plugin that counts the guest instructions executed between two addresses.
 *
 * Arguments: start=ADDRESS,stop=ADDRESS (the entries of the firmware's bench_start and
 * bench_stop). Each time the guest executes the instruction at `stop`, the plugin prints
 * "insns N" to stderr, where N is the number of instructions executed since the last
 * execution of `start`. N includes a constant marker overhead (the body of bench_start and
 * the call of bench_stop), which the firmware's empty `calibration` region measures.
 *
 * Build: cc -shared -fPIC -O2 -o insn_count.so insn_count.c
 * Run:   qemu-system-arm ... -plugin ./insn_count.so,start=0x4a0,stop=0x496 -kernel FIRMWARE
 *
 * Debian's QEMU 7.2 packages ship no qemu-plugin.h, so the few declarations used here are
 * written out below. They follow the plugin API of QEMU 7.2 (include/qemu/qemu-plugin.h,
 * API version 1), which loads any plugin that exports `qemu_plugin_version` and
 * `qemu_plugin_install`.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                                  qemu_plugin_vcpu_tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb,
                                                        size_t index);
extern uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn,
                                                       enum qemu_plugin_op op, void *ptr,
                                                       uint64_t imm);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn,
                                                   qemu_plugin_vcpu_udata_cb_t cb,
                                                   enum qemu_plugin_cb_flags flags,
                                                   void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* Instructions executed so far; the machine has one vCPU, so one counter suffices. */
static uint64_t executed;
static uint64_t at_start;
static uint64_t start_address;
static uint64_t stop_address;

static void on_start(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    (void)userdata;
    at_start = executed;
}

static void on_stop(unsigned int vcpu_index, void *userdata)
{
    (void)vcpu_index;
    (void)userdata;
    fprintf(stderr, "insns %llu\n", (unsigned long long)(executed - at_start));
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t count = qemu_plugin_tb_n_insns(tb);
    for (size_t index = 0; index < count; index++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, index);
        uint64_t address = qemu_plugin_insn_vaddr(insn);
        /* Whether a callback sees its own instruction's increment is the same at both
         * markers, so it changes N by a constant that the calibration region includes. */
        if (address == start_address) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_start, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        if (address == stop_address) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_stop, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &executed, 1);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    for (int index = 0; index < argc; index++) {
        if (strncmp(argv[index], "start=", 6) == 0) {
            start_address = strtoull(argv[index] + 6, NULL, 0);
        } else if (strncmp(argv[index], "stop=", 5) == 0) {
            stop_address = strtoull(argv[index] + 5, NULL, 0);
        } else {
            fprintf(stderr, "insn_count: unknown argument '%s'; expected start= and stop=\n",
                    argv[index]);
            return -1;
        }
    }
    if (start_address == 0 || stop_address == 0) {
        fprintf(stderr, "insn_count: both start=ADDRESS and stop=ADDRESS are required\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    return 0;
}
