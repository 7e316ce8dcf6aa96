"""What this CPU is, read once from /proc/cpuinfo: its vendor (the ``fused`` tier's rule for
oneDNN's prepacked linear layers differs by vendor), whether it has VNNI (the ``int8``
tier's activation range) and AMX's int8 products (the ``int8`` tier's engine). Where /proc/cpuinfo cannot be read: vendor unknown, no VNNI."""

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
# VNNI: int8 dot products summed into 32 bits (unknown counts as none).
HAS_VNNI = any(flag in PROCESSOR.get("flags", "").split() for flag in ("avx512_vnni", "avx_vnni"))
# AMX's int8 tile products (the ``int8`` tier's engine).
HAS_AMX_INT8 = {"amx_tile", "amx_int8"} <= set(PROCESSOR.get("flags", "").split())
