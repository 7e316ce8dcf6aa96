"""What this CPU is, read once from /proc/cpuinfo: its vendor (the ``fused`` tier's rule for
oneDNN's prepacked linear layers differs by vendor) and the instruction sets the kernels
choose by: AVX-512 (the native kernels), VNNI (the ``int8`` tier's activation range), AMX's
bfloat16 and int8 products (``fused``'s linear layers, the ``int8`` tier's engine). Where
/proc/cpuinfo cannot be read: vendor unknown, none of them."""

from typing import Dict


def first_processor() -> Dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo (empty where it cannot be read)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


PROCESSOR = first_processor()
# "GenuineIntel", "AuthenticAMD", ... ("" unknown: treated as not Intel).
CPU_VENDOR = PROCESSOR.get("vendor_id", "")
FLAGS = frozenset(PROCESSOR.get("flags", "").split())
HAS_AVX512 = "avx512f" in FLAGS
# VNNI: int8 dot products summed into 32 bits (unknown counts as none).
HAS_VNNI = not FLAGS.isdisjoint({"avx512_vnni", "avx_vnni"})
# AMX's tile products of bfloat16 (with AVX-512's bfloat16 conversions) and of int8.
HAS_AMX_BF16 = {"amx_tile", "amx_bf16", "avx512_bf16"} <= FLAGS
HAS_AMX_INT8 = {"amx_tile", "amx_int8"} <= FLAGS
