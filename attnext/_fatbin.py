"""Which GPU architectures a compiled CUDA library holds code for, read from its embedded fat binaries.

nvcc embeds one fat binary per translation unit (magic 0xBA55ED50); each holds entries of SASS (an ELF cubin
for one sm_XX) or PTX (for compute_XX, compiled by the driver at load time for that or any newer GPU). Only the
entry headers are read; no CUDA library and no GPU are needed.
"""

import struct

MAGIC = b"\x50\xed\x55\xba"
KIND_PTX, KIND_SASS = 1, 2
_FLAG_ARCH_SPECIFIC = 0x100000  # sm_90a: runs only on that exact architecture
_FLAG_FAMILY = 0x200000         # sm_100f: runs on that family


def _suffix(flags):
    if flags & _FLAG_ARCH_SPECIFIC:
        return "a"
    if flags & _FLAG_FAMILY:
        return "f"
    return ""


def entries(data):
    """[(kind, arch, suffix)] of every fat binary entry in `data` (bytes), e.g. ("sass", 90, "a")."""
    found = []
    start = data.find(MAGIC)
    while start >= 0:
        if start + 16 > len(data):
            break
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        pos, stop = start + header_size, min(start + header_size + fat_size, len(data))
        while pos + 44 <= stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            arch, = struct.unpack_from("<I", data, pos + 28)
            flags, = struct.unpack_from("<I", data, pos + 40)
            if kind in (KIND_PTX, KIND_SASS) and 10 <= arch < 1000:
                found.append(("ptx" if kind == KIND_PTX else "sass", arch, _suffix(flags)))
            if entry_header == 0:
                break
            pos += entry_header + payload
        start = data.find(MAGIC, max(stop, start + 4))
    return list(dict.fromkeys(found))


def archs(path):
    """{"sass": ["sm_80", "sm_90a"], "ptx": ["compute_90"]} for the library at `path` (sorted, distinct)."""
    with open(path, "rb") as f:
        found = entries(f.read())
    out = {"sass": [], "ptx": []}
    for kind, arch, suffix in sorted(found, key=lambda e: (e[1], e[2])):
        out[kind].append(f"{'sm' if kind == 'sass' else 'compute'}_{arch}{suffix}")
    return out


def runs_on(found, major, minor):
    """How a GPU of compute capability major.minor gets code from `found` (as archs() returns): a short text,
    or None when nothing in it can run there."""
    cc = major * 10 + minor
    for name in found["sass"]:
        arch, suffix = _parse(name)
        if arch == cc or (suffix == "" and arch // 10 == major and arch % 10 <= minor) \
                or (suffix == "f" and arch // 10 == major and arch % 10 <= minor):
            return f"{name} SASS"
    ptx = [n for n in found["ptx"] if _parse(n)[1] == "" and _parse(n)[0] <= cc]
    if ptx:
        return f"{ptx[-1]} PTX (compiled by the driver at load)"
    return None


def _parse(name):
    digits = name.split("_", 1)[1]
    suffix = digits[-1] if digits[-1].isalpha() else ""
    return int(digits.rstrip("af")), suffix
