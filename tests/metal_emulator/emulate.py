"""Run an mx.fast.metal_kernel body on Linux: wrap it the way MLX does, compile with g++ over msl_shim.h, run.

`kernel_function` re-implements MLX's `write_signature` (mlx/backend/common/metal_kernel.cpp, unchanged
from 0.29 to 0.32): template header, `[[kernel]] void custom_kernel_<name>(...)`, each input as
`const device|constant <type>*|&` (`constant` below 8 elements, `&` for 0-d arrays) followed by
`<name>_shape` (int*), `<name>_strides` (int64_t*), `<name>_ndim` (int&) when the body mentions them, the
outputs as `device <type>*`, then every MSL attribute whose name occurs in the body, in MLX's order.
`harness` adds a main() that reads the inputs, dispatches the grid (msl_shim.h) and writes the outputs;
`build` compiles harnesses with g++, `run` feeds one its inputs (buffers read through their strides).
"""

import struct
import subprocess
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

HERE = Path(__file__).parent
MAX_CONSTANT_ARRAY_SIZE = 8
TYPE_STRINGS = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t"}
# (attribute, type) in the order MLX appends them to the signature.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
EMULATED = {
    "grid_size", "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup", "thread_execution_width",
    "thread_index_in_simdgroup", "thread_index_in_threadgroup", "thread_position_in_grid",
    "thread_position_in_threadgroup", "threadgroup_position_in_grid", "threadgroups_per_grid",
    "threads_per_grid", "threads_per_simdgroup", "threads_per_threadgroup",
}  # fmt: skip


class Input:
    """One kernel input: dtype name, shape, and (for arrays) the buffer it views through element strides."""

    def __init__(self, dtype: str, value, shape=(), strides=(), size=None):
        self.dtype, self.value = dtype, value
        self.shape, self.strides = tuple(shape), tuple(strides)
        self.size = int(np.prod(self.shape)) if size is None else size  # MLX's arr.size() (logical)

    @classmethod
    def view(cls, dtype: str, base: np.ndarray, view: np.ndarray) -> "Input":
        """`view` must be a numpy view into `base` (contiguous); strides and offset come from numpy."""
        assert base.flags.c_contiguous and view.base is not None
        item = base.itemsize
        offset = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // item
        flat = base.reshape(-1)[offset:]
        return cls(dtype, flat, view.shape, [s // item for s in view.strides])


def attributes(source: str) -> List[Tuple[str, str]]:
    found = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]
    missing = [a for a, _ in found if a not in EMULATED]
    assert not missing, f"attributes not emulated by msl_shim.h: {missing}"
    return found


def shape_infos(source: str, names: Sequence[str]):
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in names]


def kernel_function(name, source, input_names, inputs, output_names, output_dtypes, template) -> str:
    """The kernel exactly as MLX's write_signature emits it (minus the host_name instantiation)."""
    lines = []
    if template:
        params = ", ".join(("typename " if isinstance(v, str) else "int ") + k for k, v in template)
        lines.append(f"template <{params}>")
    lines.append(f"[[kernel]] void {name}(")
    args, index = [], 0
    for n, inp, (sh, st, nd) in zip(input_names, inputs, shape_infos(source, input_names)):
        location = "constant" if inp.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if len(inp.shape) == 0 else "*"
        args.append(f"  const {location} {TYPE_STRINGS[inp.dtype]}{ref} {n} [[buffer({index})]]")
        index += 1
        if len(inp.shape) > 0:
            for flag, decl in ((sh, f"int* {n}_shape"), (st, f"int64_t* {n}_strides"), (nd, f"int& {n}_ndim")):
                if flag:
                    args.append(f"  const constant {decl} [[buffer({index})]]")
                    index += 1
    for n, dt in zip(output_names, output_dtypes):
        args.append(f"  device {TYPE_STRINGS[dt]}* {n} [[buffer({index})]]")
        index += 1
    args += [f"  {t} {a} [[{a}]]" for a, t in attributes(source)]
    return "\n".join(lines) + "\n" + ",\n".join(args) + ") {\n" + source + "\n}\n"


def harness(name, source, input_names, inputs, output_names, output_dtypes, template) -> str:
    """kernel_function plus a main(input_file, output_file) that dispatches it."""
    infos = shape_infos(source, input_names)
    body, call = [], []
    for i, (n, inp, (sh, st, nd)) in enumerate(zip(input_names, inputs, infos)):
        ctype = "int32_t" if inp.dtype == "int32" else "float"
        if len(inp.shape) == 0:
            body.append(f"  {ctype} in{i} = read_scalar<{ctype}>(f);")
            call.append(f"in{i}")
            continue
        body.append(f"  Array<{ctype}> in{i} = read_array<{ctype}>(f);")
        call.append(f"in{i}.data.data()")
        call += [a for flag, a in ((sh, f"in{i}.shape.data()"), (st, f"in{i}.strides.data()"), (nd, f"in{i}.ndim"))
                 if flag]  # fmt: skip
    body.append("  uint3 grid = read_dims(f), group = read_dims(f);")
    for o, _ in enumerate(output_names):
        body.append(f"  std::vector<float> out{o}(read_scalar<int64_t>(f));")
        call.append(f"out{o}.data()")
    call += [f"t.{a}" for a, _ in attributes(source)]
    targs = "<" + ", ".join(str(v) for _, v in template) + ">" if template else ""
    writes = "\n".join(f"  fwrite(out{o}.data(), 4, out{o}.size(), g);" for o, _ in enumerate(output_names))
    return f"""#include <cstdio>
#include "msl_shim.h"

{kernel_function(name, source, input_names, inputs, output_names, output_dtypes, template)}
template <typename T> struct Array {{ int ndim; std::vector<int> shape; std::vector<int64_t> strides; std::vector<T> data; }};
template <typename T> T read_scalar(FILE* f) {{ T x; if (fread(&x, sizeof(T), 1, f) != 1) throw 1; return x; }}
template <typename T> Array<T> read_array(FILE* f) {{
  Array<T> a; a.ndim = int(read_scalar<int64_t>(f));
  for (int d = 0; d < a.ndim; d++) a.shape.push_back(int(read_scalar<int64_t>(f)));
  for (int d = 0; d < a.ndim; d++) a.strides.push_back(read_scalar<int64_t>(f));
  a.data.resize(read_scalar<int64_t>(f));
  if (fread(a.data.data(), sizeof(T), a.data.size(), f) != a.data.size()) throw 2;
  return a;
}}
uint3 read_dims(FILE* f) {{ uint3 d; d.x = uint(read_scalar<int64_t>(f)); d.y = uint(read_scalar<int64_t>(f)); d.z = uint(read_scalar<int64_t>(f)); return d; }}

int main(int argc, char** argv) {{
  FILE* f = fopen(argv[1], "rb");
{chr(10).join(body)}
  fclose(f);
  msl::dispatch_threads(grid, group, [&](msl::Thread& t) {{
    {name}{targs}({", ".join(call)});
  }});
  FILE* g = fopen(argv[2], "wb");
{writes}
  fclose(g);
  return 0;
}}
"""


def build(workdir: Path, kernels: dict) -> dict:
    """Compile harnesses in parallel: {key: harness(...) argument tuple} -> {key: executable}."""
    procs = {}
    for i, (key, args) in enumerate(kernels.items()):
        cpp, exe = workdir / f"kernel{i}.cpp", workdir / f"kernel{i}"
        cpp.write_text(harness(*args))
        cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-Wno-attributes", f"-I{HERE}", str(cpp), "-o", str(exe)]
        procs[key] = (exe, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
    for exe, proc in procs.values():
        err = proc.communicate()[1]
        assert proc.returncode == 0, f"g++ failed:\n{err[-4000:]}"
    return {key: exe for key, (exe, _) in procs.items()}


def run(exe: Path, inputs: Sequence[Input], output_sizes, grid, threadgroup, timeout: float = 60) -> List[np.ndarray]:
    data = bytearray()
    for inp in inputs:
        ctype = np.int32 if inp.dtype == "int32" else np.float32
        if len(inp.shape) == 0:
            data += np.asarray(inp.value, ctype).tobytes()
            continue
        buf = np.ascontiguousarray(inp.value, ctype).reshape(-1)
        data += struct.pack(f"<{1 + 2 * len(inp.shape) + 1}q", len(inp.shape), *inp.shape, *inp.strides, buf.size)
        data += buf.tobytes()
    data += struct.pack("<6q", *grid, *threadgroup)
    data += struct.pack(f"<{len(output_sizes)}q", *output_sizes)
    src, dst = exe.with_suffix(".in"), exe.with_suffix(".out")
    src.write_bytes(bytes(data))
    subprocess.run([str(exe), str(src), str(dst)], check=True, timeout=timeout)
    flat = np.fromfile(dst, np.float32)
    return np.split(flat, np.cumsum(output_sizes)[:-1])
