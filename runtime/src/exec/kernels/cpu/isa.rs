//! The instruction sets the CPU kernels are compiled for, detected once per process.
//!
//! Every CPU kernel — quantized and float products, decode and chunk attention,
//! elementwise ops — dispatches on [`Isa::best`], so one environment variable, `KVC_ISA`,
//! makes an AVX-512 machine compute exactly what an AVX2-only (or a portable-only) machine
//! does. "AVX-512" means one thing everywhere: F, BW, VL and VNNI, on top of the AVX2 set.

use std::sync::OnceLock;

/// An instruction set the kernels are compiled for, narrowest first (`Ord` follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable code (autovectorised for the build target, baseline x86-64 here).
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F, BW and VL with VNNI, plus the AVX2 set.
    Avx512,
}

impl Isa {
    /// Every set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU runs the kernels of this set (detected once).
    pub fn available(self) -> bool {
        self <= widest()
    }

    /// The set the kernels run: the widest available, unless the environment variable
    /// `KVC_ISA` names a narrower one this CPU has (`avx2`, `portable`). Any other value is
    /// reported once on stderr and ignored.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let widest = widest();
            let Ok(name) = std::env::var("KVC_ISA") else {
                return widest;
            };
            match Isa::named(&name) {
                Some(isa) if isa <= widest => isa,
                _ => {
                    eprintln!(
                        "kvc: KVC_ISA={name:?} is not a kernel set this CPU runs \
                         (avx512, avx2, portable); using {}",
                        widest.name()
                    );
                    widest
                }
            }
        })
    }

    /// The set called `name` (`avx512`, `avx2`, `portable`, any case).
    pub fn named(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name))
    }

    /// The name `KVC_ISA` and kernel names use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The sets a kernel test runs here, printed (once per `what` and process) so that a
    /// test log says what it covered: CI machines differ, some have AVX-512, some only AVX2.
    #[cfg(test)]
    pub(crate) fn covered(what: &str, from: &[Isa]) -> Vec<Isa> {
        static SAID: std::sync::Mutex<std::collections::BTreeSet<String>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        let (run, skipped): (Vec<Isa>, Vec<Isa>) = from.iter().partition(|i| i.available());
        let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
        if !said.insert(what.to_string()) {
            return run;
        }
        let names = |v: &[Isa]| v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
        eprintln!(
            "{what}: instruction sets covered: {}{}",
            names(&run),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" (not on this CPU: {})", names(&skipped))
            }
        );
        run
    }
}

/// The widest set this CPU has, detected once per process.
fn widest() -> Isa {
    static WIDEST: OnceLock<Isa> = OnceLock::new();
    *WIDEST.get_or_init(detect)
}

/// The widest set this CPU has.
fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}
