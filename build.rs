//! Build script: the CUDA kernels of `kernels/*.cu`.
//!
//! 1. Parses every `extern "C" __global__ void name(params)` of `kernels/*.cu` and generates
//!    a Rust table of kernel signatures (`$OUT_DIR/kernels_gen.rs`).
//! 2. CPU execution: compiles the same sources with the host C++ compiler (`cc`) against
//!    `kernels/cpu/cuda_cpu.h`, plus generated trampolines (one per kernel) that unpack a
//!    `void** args` array like `cuLaunchKernel` and run the kernel on the CPU runtime
//!    (`kernels/cpu/runtime.cpp`). `IMPLICIT_ETF_ASAN=1` builds it with AddressSanitizer.
//! 3. GPU: if `nvcc` is found (`NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`), compiles every
//!    kernel file to PTX (`compute_75`, portable) and to an `sm_90` cubin, embeds both, and
//!    writes the ptxas resource report to `$OUT_DIR/ptxas-report.tsv` (also copied to
//!    `$IMPLICIT_ETF_PTXAS_REPORT_OUT` when set). Without `nvcc` (or if it fails, unless
//!    `IMPLICIT_ETF_REQUIRE_NVCC=1`) it prints one `cargo:warning` and embeds the sources only;
//!    they are then compiled at run time with NVRTC. Never uses the network.

use std::collections::HashSet;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Param {
    /// C type as written, without `__restrict__`.
    ctype: String,
    /// Rust expression of the `Param` kind.
    kind: String,
    /// The C parameter name.
    name: String,
}

struct Kernel {
    name: String,
    file_index: usize,
    params: Vec<Param>,
}

fn main() {
    // The device layer exists with either backend; without both the crate is the CPU head only.
    println!("cargo::rustc-check-cfg=cfg(device)");
    println!("cargo::rustc-check-cfg=cfg(cpu_asan)");
    let device = env::var_os("CARGO_FEATURE_CUDA").is_some()
        || env::var_os("CARGO_FEATURE_CPU_EXEC").is_some();
    if !device {
        return;
    }
    println!("cargo:rustc-cfg=device");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "IMPLICIT_ETF_ASAN",
        "IMPLICIT_ETF_PTXAS_REPORT_OUT",
        "IMPLICIT_ETF_REQUIRE_NVCC",
        "IMPLICIT_ETF_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    // Every `.cu` under kernels/ except the CPU execution's own folder; `kernels/test/` (the
    // execution-model self tests) only with the `test-kernels` feature, so that they are not
    // part of a user's library or PTX.
    let test_kernels = env::var_os("CARGO_FEATURE_TEST_KERNELS").is_some();
    let mut files: Vec<PathBuf> = walk(&kdir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .filter(|p| !p.starts_with(kdir.join("cpu")))
        .filter(|p| test_kernels || !p.starts_with(kdir.join("test")))
        .collect();
    files.sort();
    // `head/stats` for kernels/head/stats.cu.
    let keys: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&kdir)
                .unwrap()
                .with_extension("")
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    for entry in walk(&kdir) {
        println!("cargo:rerun-if-changed={}", entry.display());
    }

    // ---- parse signatures ------------------------------------------------------------------
    let mut kernels = Vec::new();
    let mut sources = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let src = fs::read_to_string(f).unwrap();
        for k in parse_kernels(&src, f) {
            kernels.push(Kernel {
                name: k.0,
                file_index: fi,
                params: k.1,
            });
        }
        sources.push(src);
    }
    let mut names = HashSet::new();
    for k in &kernels {
        assert!(
            names.insert(k.name.clone()),
            "kernel `{}` defined twice in kernels/*.cu",
            k.name
        );
    }

    // ---- CPU execution ---------------------------------------------------------------------
    let asan = env::var("IMPLICIT_ETF_ASAN").is_ok_and(|v| v == "1");
    if asan {
        println!("cargo:rustc-cfg=cpu_asan");
    }
    #[cfg(feature = "cpu-exec")]
    build_cpu_execution(&out, &kdir, &keys, &sources, &kernels, asan);

    // ---- nvcc ------------------------------------------------------------------------------
    let require = env::var("IMPLICIT_ETF_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let nvcc = if !cuda || env::var("IMPLICIT_ETF_NO_NVCC").is_ok_and(|v| v == "1") {
        None
    } else {
        find_nvcc()
    };
    let mut gpu: Vec<Option<(PathBuf, PathBuf)>> = vec![None; files.len()];
    let mut report = String::from(
        "file\tkernel\tregisters\tspill_stores_bytes\tspill_loads_bytes\tstack_frame_bytes\tsmem_bytes\n",
    );
    let mut raw_log = String::new();
    let mut nvcc_used = None;
    match &nvcc {
        None => {
            if require {
                panic!("IMPLICIT_ETF_REQUIRE_NVCC=1 but no nvcc found (NVCC, CUDA_HOME, CUDA_PATH, PATH)");
            }
            if cuda {
                println!("cargo:warning=implicit-etf: nvcc not found (NVCC, CUDA_HOME/CUDA_PATH, PATH); embedding the CUDA sources, which NVRTC compiles at run time on a GPU machine");
            }
        }
        Some(nvcc) => {
            let mut ok = true;
            for (fi, f) in files.iter().enumerate() {
                let stem = keys[fi].replace('/', "_");
                let ptx = out.join(format!("{stem}.ptx"));
                let cubin = out.join(format!("{stem}.sm_90.cubin"));
                let r1 = run_nvcc(nvcc, &kdir, f, &["-ptx", "-arch=compute_75"], &ptx);
                let r2 = run_nvcc(
                    nvcc,
                    &kdir,
                    f,
                    &["-cubin", "-arch=sm_90", "-Xptxas", "-v"],
                    &cubin,
                );
                match (r1, r2) {
                    (Ok(_), Ok(log)) => {
                        raw_log.push_str(&log);
                        report.push_str(&parse_ptxas(&stem, &log));
                        gpu[fi] = Some((ptx, cubin));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        if require {
                            panic!("nvcc failed on {}:\n{e}", f.display());
                        }
                        println!(
                            "cargo:warning=implicit-etf: nvcc failed on {} (falling back to NVRTC at run time): {}",
                            f.display(),
                            e.lines().next().unwrap_or("")
                        );
                        ok = false;
                    }
                }
            }
            if ok {
                nvcc_used = Some(nvcc.display().to_string());
            }
        }
    }
    let report_path = out.join("ptxas-report.tsv");
    write_if_changed(&report_path, &report);
    write_if_changed(&out.join("ptxas-raw.log"), &raw_log);
    if let Ok(dst) = env::var("IMPLICIT_ETF_PTXAS_REPORT_OUT") {
        if !dst.is_empty() {
            let _ = fs::copy(&report_path, &dst);
        }
    }

    // ---- Rust table and typed launch wrappers ----------------------------------------------
    let mut rs = String::from("// Generated by build.rs from kernels/**/*.cu. Do not edit.\n");
    for (fi, f) in files.iter().enumerate() {
        let key = &keys[fi];
        let stem = key.replace('/', "_");
        let inlined = inline_includes(f, &kdir, &mut HashSet::new());
        let src_path = out.join(format!("{stem}.nvrtc.cu"));
        write_if_changed(&src_path, &inlined);
        let (ptx, cubin) = match &gpu[fi] {
            Some((p, c)) => (
                format!("Some(include_str!({:?}))", p.display().to_string()),
                format!("Some(include_bytes!({:?}))", c.display().to_string()),
            ),
            None => ("None".into(), "None".into()),
        };
        writeln!(
            rs,
            "static FILE_{fi}: KernelFile = KernelFile {{ name: {key:?}, source: include_str!({:?}), ptx: {ptx}, cubin_sm90: {cubin} }};",
            src_path.display().to_string()
        )
        .unwrap();
    }
    for k in &kernels {
        let ps: Vec<&str> = k.params.iter().map(|p| p.kind.as_str()).collect();
        writeln!(
            rs,
            "static SIG_{0}: KernelSig = KernelSig {{ name: {0:?}, file: &FILE_{1}, params: &[{2}] }};",
            k.name,
            k.file_index,
            ps.join(", ")
        )
        .unwrap();
    }
    writeln!(rs, "pub(crate) static KERNELS: &[&KernelSig] = &[").unwrap();
    for k in &kernels {
        writeln!(rs, "    &SIG_{},", k.name).unwrap();
    }
    rs.push_str("];\n");
    // One module per kernel file (`kernels::head::stats` for kernels/head/stats.cu), one
    // `unsafe fn` per kernel.
    let mut groups: std::collections::BTreeMap<String, Vec<(String, usize)>> = Default::default();
    for (fi, key) in keys.iter().enumerate() {
        let (group, file) = key.split_once('/').unwrap_or(("", key));
        groups
            .entry(group.to_string())
            .or_default()
            .push((file.to_string(), fi));
    }
    for (group, members) in &groups {
        if !group.is_empty() {
            writeln!(rs, "/// Kernels of `kernels/{group}/`.\npub mod {group} {{").unwrap();
        }
        for (file, fi) in members {
            let key = &keys[*fi];
            writeln!(
                rs,
                "/// The kernels of `kernels/{key}.cu`, one typed launch each.\npub mod {file} {{\n#[allow(unused_imports)]\nuse crate::runtime::{{Arg, Buffer, Device, LaunchConfig}};\nuse crate::error::Result;"
            )
            .unwrap();
            for k in kernels.iter().filter(|k| k.file_index == *fi) {
                write_wrapper(&mut rs, k, key);
            }
            rs.push_str("}\n");
        }
        if !group.is_empty() {
            rs.push_str("}\n");
        }
    }
    writeln!(
        rs,
        "pub(crate) const PTXAS_REPORT: Option<&str> = {};",
        if nvcc_used.is_some() {
            format!(
                "Some(include_str!({:?}))",
                report_path.display().to_string()
            )
        } else {
            "None".into()
        }
    )
    .unwrap();
    writeln!(
        rs,
        "pub(crate) const NVCC_USED: Option<&str> = {nvcc_used:?};"
    )
    .unwrap();
    write_if_changed(&out.join("kernels_gen.rs"), &rs);
}

/// Rust keywords a C parameter name may collide with (suffixed with `_`).
const RESERVED: &[&str] = &[
    "as", "async", "await", "box", "break", "const", "continue", "crate", "dyn", "else", "enum",
    "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move",
    "mut", "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "yield", "dev", "cfg",
];

/// One typed launch: `&Buffer` for `const T*`, `&mut Buffer` for `T*`, `Option<&Buffer>` for
/// the optional `gate` pointer and for `const` pointers named `opt_*` (null when absent), Rust
/// scalars for scalars.
fn write_wrapper(rs: &mut String, k: &Kernel, key: &str) {
    let mut params = Vec::new();
    let mut args = Vec::new();
    let mut csig = Vec::new();
    for p in &k.params {
        let name = if RESERVED.contains(&p.name.as_str()) {
            format!("{}_", p.name)
        } else {
            p.name.clone()
        };
        csig.push(format!("{} {}", p.ctype, p.name));
        if p.ctype.ends_with('*') {
            let writable = !p.ctype.split_whitespace().any(|t| t == "const");
            if p.name == "gate" || (!writable && p.name.starts_with("opt_")) {
                params.push(format!("{name}: Option<&Buffer>"));
                args.push(format!(
                    "match {name} {{ Some(b) => Arg::Buf(b), None => Arg::Null }}"
                ));
            } else if writable {
                params.push(format!("{name}: &mut Buffer"));
                args.push(format!("Arg::Buf(&*{name})"));
            } else {
                params.push(format!("{name}: &Buffer"));
                args.push(format!("Arg::Buf({name})"));
            }
        } else {
            let (rty, variant) = match p.kind.as_str() {
                k if k.contains("I32") => ("i32", "I32"),
                k if k.contains("U32") => ("u32", "U32"),
                k if k.contains("I64") => ("i64", "I64"),
                k if k.contains("U64") => ("u64", "U64"),
                k if k.contains("F32") => ("f32", "F32"),
                k if k.contains("F64") => ("f64", "F64"),
                other => panic!("kernel {}: scalar kind {other}", k.name),
            };
            params.push(format!("{name}: {rty}"));
            args.push(format!("Arg::{variant}({name})"));
        }
    }
    writeln!(
        rs,
        "/// Launches `{}({})` of `kernels/{key}.cu`.\n///\n/// Pointer element types and the device of every buffer are checked (a typed error);\n/// sizes are not.\n///\n/// # Safety\n/// Every buffer must hold at least as many elements as the kernel reads or writes at the\n/// given sizes and launch shape (see the kernel's source).\n#[allow(clippy::too_many_arguments, dead_code)]\npub unsafe fn {}(dev: &Device, cfg: LaunchConfig{}{}) -> Result<()> {{\n    // SAFETY: forwarded to the caller (see `# Safety`).\n    unsafe {{ dev.launch(&super::{}SIG_{}, cfg, &[{}]) }}\n}}",
        k.name,
        csig.join(", "),
        k.name,
        if params.is_empty() { "" } else { ", " },
        params.join(", "),
        if key.contains('/') { "super::" } else { "" },
        k.name,
        args.join(", ")
    )
    .unwrap();
}

/// Compiles the kernels and the CPU runtime of `kernels/cpu/` for the host (feature
/// `cpu-exec`), with generated trampolines that unpack a `void** args` array like
/// `cuLaunchKernel`.
#[cfg(feature = "cpu-exec")]
fn build_cpu_execution(
    out: &Path,
    kdir: &Path,
    keys: &[String],
    sources: &[String],
    kernels: &[Kernel],
    asan: bool,
) {
    let cpu_dir = out.join("cpu");
    fs::create_dir_all(&cpu_dir).unwrap();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(kdir)
        .flag_if_supported("-pthread")
        // Everything of the CPU execution is local to the binary that links it: only the
        // Rust side calls into it, within the same link.
        .flag_if_supported("-fvisibility=hidden")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .opt_level(2)
        .file(kdir.join("cpu/runtime.cpp"));
    if asan {
        build
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer")
            .flag("-g");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    for (fi, key) in keys.iter().enumerate() {
        let stem = key.replace('/', "_");
        let mut cpp = String::new();
        writeln!(cpp, "#line 1 \"kernels/{key}.cu\"").unwrap();
        // Kernels get internal linkage on the host (only this file's trampolines call them),
        // so no kernel name becomes a symbol of a user's binary.
        cpp.push_str(
            &rewrite_dynamic_shared(&sources[fi])
                .replace("extern \"C\" __global__", "static __global__"),
        );
        cpp.push_str("\n// ---- generated trampolines ----\n#include <functional>\n#include <string>\nnamespace etf_cpu { std::string run_grid(dim3, dim3, size_t, const std::function<void()>&); }\n");
        for k in kernels.iter().filter(|k| k.file_index == fi) {
            writeln!(
                cpp,
                "std::string etf_cpu_tramp_{}(dim3 g, dim3 b, size_t sh, void** args) {{",
                k.name
            )
            .unwrap();
            let mut call = Vec::new();
            for (i, p) in k.params.iter().enumerate() {
                writeln!(cpp, "    {} a{i} = *({}*)args[{i}];", p.ctype, p.ctype).unwrap();
                call.push(format!("a{i}"));
            }
            writeln!(
                cpp,
                "    std::function<void()> fn = [=]() {{ {}({}); }};\n    return etf_cpu::run_grid(g, b, sh, fn);\n}}",
                k.name,
                call.join(", ")
            )
            .unwrap();
        }
        let path = cpu_dir.join(format!("{stem}.cpp"));
        write_if_changed(&path, &cpp);
        build.file(path);
    }
    let mut reg = String::from(
        "#include \"cpu/cuda_cpu.h\"\n#include <cstring>\n#include <string>\n#include <cstdio>\n",
    );
    for k in kernels {
        writeln!(
            reg,
            "std::string etf_cpu_tramp_{}(dim3, dim3, size_t, void**);",
            k.name
        )
        .unwrap();
    }
    reg.push_str("struct EtfCpuEntry { const char* name; size_t nargs; std::string (*f)(dim3, dim3, size_t, void**); };\nstatic const EtfCpuEntry ETF_CPU_KERNELS[] = {\n");
    for k in kernels {
        writeln!(
            reg,
            "    {{\"{0}\", {1}, etf_cpu_tramp_{0}}},",
            k.name,
            k.params.len()
        )
        .unwrap();
    }
    reg.push_str(
        r#"};
// Launches kernel `name` on the CPU execution. Returns 0, or 1 with a message in `err`.
extern "C" int etf_cpu_launch(const char* name, const unsigned* grid, const unsigned* block,
                              size_t shmem, void** args, size_t nargs, char* err, size_t errlen) {
    std::string e;
    bool found = false;
    for (const auto& k : ETF_CPU_KERNELS) {
        if (std::strcmp(k.name, name) != 0) continue;
        found = true;
        if (k.nargs != nargs) {
            e = "kernel " + std::string(name) + " takes " + std::to_string(k.nargs) +
                " arguments, got " + std::to_string(nargs);
        } else {
            e = k.f(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shmem, args);
        }
    }
    if (!found) e = "no kernel named " + std::string(name);
    if (e.empty()) return 0;
    if (errlen) std::snprintf(err, errlen, "%s", e.c_str());
    return 1;
}
"#,
    );
    let reg_path = cpu_dir.join("registry.cpp");
    write_if_changed(&reg_path, &reg);
    build.file(reg_path);
    build.compile("implicit_etf_cpu_kernels");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}

fn write_if_changed(path: &Path, content: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(content) {
        fs::write(path, content).unwrap();
    }
}

/// Removes `//` and `/* */` comments (keeps newlines), so signatures can be parsed.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut o = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    o.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else {
            o.push(b[i] as char);
            i += 1;
        }
    }
    o
}

/// Finds `extern "C" __global__ void name(params)` (a `__launch_bounds__(...)` before the
/// name is allowed).
fn parse_kernels(src: &str, file: &Path) -> Vec<(String, Vec<Param>)> {
    let mut s = strip_comments(src);
    while let Some(pos) = s.find("__launch_bounds__(") {
        let end = s[pos..]
            .find(')')
            .expect("closing parenthesis of __launch_bounds__")
            + pos;
        s.replace_range(pos..=end, " ");
    }
    let mut out = Vec::new();
    let pat = "extern \"C\" __global__";
    let mut rest = s.as_str();
    while let Some(pos) = rest.find(pat) {
        rest = &rest[pos + pat.len()..];
        let open = rest.find('(').expect("kernel parameter list");
        let head: Vec<&str> = rest[..open].split_whitespace().collect();
        let name = head.last().expect("kernel name").to_string();
        assert!(
            head.first() == Some(&"void"),
            "{}: kernel {name} must be `extern \"C\" __global__ void name(...)`",
            file.display()
        );
        let close = rest[open..].find(')').expect("closing parenthesis") + open;
        let plist = rest[open + 1..close].trim();
        let mut params = Vec::new();
        if !plist.is_empty() && plist != "void" {
            for p in plist.split(',') {
                let p = p.replace("__restrict__", " ");
                let p = p.replace('*', " * ");
                let toks: Vec<&str> = p.split_whitespace().collect();
                let (ty, pname) = toks.split_at(toks.len() - 1);
                let ctype = ty.join(" ").replace(" *", "*");
                let kind = param_kind(&ctype).unwrap_or_else(|| {
                    panic!(
                        "{}: kernel {name}: unsupported parameter type `{ctype}` (see kernels/README.md)",
                        file.display()
                    )
                });
                params.push(Param {
                    ctype,
                    kind,
                    name: pname[0].to_string(),
                });
            }
        }
        out.push((name, params));
        rest = &rest[close..];
    }
    out
}

fn param_kind(ctype: &str) -> Option<String> {
    let is_ptr = ctype.ends_with('*');
    let is_const = ctype.split_whitespace().any(|t| t == "const");
    let base: Vec<&str> = ctype
        .trim_end_matches('*')
        .split_whitespace()
        .filter(|t| *t != "const")
        .collect();
    let dt = match base.join(" ").as_str() {
        "float" => "F32",
        "double" => "F64",
        "int" => "I32",
        "unsigned int" | "unsigned" => "U32",
        "long long" => "I64",
        "unsigned long long" => "U64",
        "__half" => "F16",
        "__nv_bfloat16" => "BF16",
        "unsigned char" => "U8",
        _ => return None,
    };
    if is_ptr {
        Some(format!(
            "Param::Ptr {{ dtype: DType::{dt}, writable: {} }}",
            !is_const
        ))
    } else {
        match dt {
            "F16" | "BF16" | "U8" => None,
            _ => Some(format!("Param::Scalar(DType::{dt})")),
        }
    }
}

/// `extern __shared__ T name[];` -> `T* name = (T*)::etf_cpu::dynamic_shared();`
#[cfg(feature = "cpu-exec")]
fn rewrite_dynamic_shared(src: &str) -> String {
    let mut o = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("extern __shared__ ") {
            if let Some(decl) = rest.trim_end().strip_suffix("[];") {
                let toks: Vec<&str> = decl.split_whitespace().collect();
                let (ty, name) = toks.split_at(toks.len() - 1);
                let ty: Vec<&str> = ty
                    .iter()
                    .copied()
                    .filter(|t| !t.starts_with("__align__"))
                    .collect();
                let ty = ty.join(" ");
                let indent = &line[..line.len() - t.len()];
                writeln!(
                    o,
                    "{indent}{ty}* {} = ({ty}*)::etf_cpu::dynamic_shared();",
                    name[0]
                )
                .unwrap();
                continue;
            }
        }
        o.push_str(line);
        o.push('\n');
    }
    o
}

/// Inlines `#include "..."` of files under kernels/ (for NVRTC, which sees one string).
fn inline_includes(f: &Path, kdir: &Path, seen: &mut HashSet<PathBuf>) -> String {
    let src = fs::read_to_string(f).unwrap();
    let mut o = String::new();
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let inc = rest.trim_end_matches('"');
            let p = f.parent().unwrap().join(inc);
            let p = if p.exists() { p } else { kdir.join(inc) };
            if p.exists() {
                if seen.insert(p.clone()) {
                    o.push_str(&inline_includes(&p, kdir, seen));
                }
                continue;
            }
        }
        if t == "#pragma once" {
            continue;
        }
        o.push_str(line);
        o.push('\n');
    }
    o
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| if p.is_file() { Some(p) } else { None };
    if let Ok(n) = env::var("NVCC") {
        if !n.is_empty() {
            return exe(PathBuf::from(n));
        }
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = env::var(v) {
            if let Some(p) = exe(Path::new(&h).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

fn run_nvcc(
    nvcc: &Path,
    kdir: &Path,
    src: &Path,
    args: &[&str],
    out: &Path,
) -> Result<String, String> {
    let mut cmd = Command::new(nvcc);
    cmd.args(args)
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-I")
        .arg(kdir)
        .arg("-o")
        .arg(out)
        .arg(src);
    if let Some(bin) = nvcc.parent() {
        let cccl = bin.join("../include/cccl");
        if cccl.is_dir() {
            cmd.arg("-I").arg(cccl);
        }
    }
    match cmd.output() {
        Err(e) => Err(format!("cannot run {}: {e}", nvcc.display())),
        Ok(o) if !o.status.success() => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(o) => Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
    }
}

/// Turns `ptxas -v` output into TSV rows (see the header in `main`).
fn parse_ptxas(file: &str, log: &str) -> String {
    let mut rows = String::new();
    let mut cur: Option<String> = None;
    let (mut stack, mut st, mut ld) = (0u64, 0u64, 0u64);
    let num_before = |line: &str, key: &str| -> u64 {
        line.find(key)
            .and_then(|p| line[..p].split_whitespace().last())
            .and_then(|t| t.trim_end_matches(',').parse().ok())
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(p) = line.find("Compiling entry function '") {
            let rest = &line[p + "Compiling entry function '".len()..];
            cur = rest.split('\'').next().map(str::to_string);
            (stack, st, ld) = (0, 0, 0);
        } else if line.contains("bytes stack frame") {
            stack = num_before(line, "bytes stack frame");
            st = num_before(line, "bytes spill stores");
            ld = num_before(line, "bytes spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(k) = cur.take() {
                let regs = num_before(line, "registers");
                let smem = num_before(line, "bytes smem");
                writeln!(rows, "{file}\t{k}\t{regs}\t{st}\t{ld}\t{stack}\t{smem}").unwrap();
            }
        }
    }
    rows
}
