//! Runs the plans of a verified program over Burn tensors.
//!
//! Ownership: a value is moved into its last reader and shared with earlier ones; a
//! state variable the graph updates in place is moved out of the state when read. The KV
//! caches therefore have exactly one owner when `kv_write` runs, so the backend updates
//! them in place instead of copying (a live handle would force a full copy every step),
//! and every state variable keeps its buffer across runs (see [`super::plan`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::{Device, IntDType};
use kvc_compiler::ir::{DType, Program, StateId};

use super::kernels::portable::binary;
use super::kernels::{KernelSet, Kernels, Live, ieee_op};
use super::plan::{Arg, Kernel, Lengths, Plan, WriteBack};
use super::value::{Value, cast, to_f32};
use crate::RuntimeError;
use crate::exec::kernels::portable::{attention_mass, gather_rows, sample};

/// The device-resident state of a program: one value per state variable. Its buffers
/// stay the same from allocation to drop: graph runs and host writes update them in place.
pub struct State {
    values: Vec<Option<Value>>,
}

impl State {
    /// Fresh state with every variable at its declared initial value.
    pub fn new(p: &Program, device: &Device) -> State {
        State {
            values: p
                .state
                .iter()
                .map(|s| {
                    let v = cast(Value::full(s.init, &s.ty.shape, device), s.ty.dtype);
                    Some(touch(v))
                })
                .collect(),
        }
    }

    /// Drops every value (the state must be rebuilt with [`State::new`] before a run).
    pub fn clear(&mut self) {
        self.values.clear();
    }

    /// The current value of a state variable.
    pub fn get(&self, id: StateId) -> &Value {
        self.values[id.0 as usize]
            .as_ref()
            .expect("state is restored after every run")
    }

    /// Writes a host-made value into a state variable's buffer (outside any graph run).
    pub fn write(&mut self, id: StateId, v: Value) {
        self.values[id.0 as usize]
            .as_mut()
            .expect("state is restored after every run")
            .assign(v);
    }

    /// Copies of the given variables in buffers of their own.
    pub fn snapshot(&self, ids: &[StateId]) -> Vec<(StateId, Value)> {
        ids.iter()
            .map(|&id| (id, self.get(id).deep_copy()))
            .collect()
    }

    /// Writes snapshot values back into their variables' buffers.
    pub fn restore(&mut self, saved: Vec<(StateId, Value)>) {
        for (id, v) in saved {
            self.write(id, v);
        }
    }
}

/// Writes every element of a fresh value. A zero-filled buffer may come from the OS as
/// untouched pages, which would then be faulted in one cache slot at a time as decode fills
/// the cache (measured: resident memory grew ≈ 43 KB per step, exactly one slot of every
/// layer's keys and values). Touching the state once at allocation makes the cache
/// resident up front, as the memory plan counts it, and keeps resident memory flat while
/// decoding.
fn touch(v: Value) -> Value {
    match v {
        Value::F(t) => Value::F(t.add_scalar(0.0f32)),
        Value::I(t) => Value::I(t.add_scalar(0)),
        Value::B(t) => Value::B(t),
        Value::Q(q) => Value::Q(q),
    }
}

/// Makes allocations of 1 MiB and more come from fresh pages of the OS (glibc's
/// `M_MMAP_THRESHOLD`, fixed instead of the adaptive default, which after the first free
/// of a large buffer serves the next ones from the heap). A prefill that skips padding
/// writes only its real rows into buffers of the full padded shape: a zeroed buffer of
/// fresh pages costs nothing where nobody writes, where a recycled heap buffer must be
/// cleared whole. Measured (SmolLM2, batch 16, T = 64, Intel Xeon, 2 threads): a refill
/// of one 64-token row 406 → 212 ms. Process-wide and once; elsewhere than glibc, nothing.
fn large_buffers_from_fresh_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets an allocator parameter; called before the executor
        // allocates its plans, and only once.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        });
    }
}

/// Whether some graph run holds [`Polling`] (one at a time).
static POLLING: AtomicBool = AtomicBool::new(false);

/// Keeps rayon's other workers looking for work through one graph run. A worker that finds
/// none sleeps within microseconds, and waking it (a futex call, and on a virtual machine
/// an interrupt to a halted virtual CPU) cost 10–30 µs per parallel kernel, paid ≈ 210
/// times per decode step of a small model. While a run holds this, every other worker of
/// the pool polls for work instead (`rayon::yield_now`), so a kernel's tasks start on all
/// of them at once.
///
/// The pollers are detached jobs (`rayon::spawn_broadcast`): the run never waits for
/// them, so a worker that is busy or blocked elsewhere delays nothing. A poller returns
/// when the run ends, or once it has found no work for [`Polling::IDLE`]. A worker that
/// picks up its poller while suspended inside a task (waiting on a join) resumes that
/// task only when the poller returns; the idle limit bounds that wait once the pool has
/// nothing else to do, and only one run at a time polls.
struct Polling {
    hot: Arc<AtomicBool>,
}

impl Polling {
    /// How long a poller looks for work without finding any before it returns.
    const IDLE: Duration = Duration::from_micros(500);

    /// Starts a poller on every worker of the current pool but the calling one, unless
    /// the pool has one thread or another run holds polling. Polling ends when the result
    /// drops.
    fn start() -> Option<Polling> {
        if rayon::current_num_threads() < 2
            || POLLING
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let me = rayon::current_thread_index();
        let hot = Arc::new(AtomicBool::new(true));
        let flag = hot.clone();
        rayon::spawn_broadcast(move |ctx| {
            if Some(ctx.index()) == me {
                return;
            }
            let mut idle_since = Instant::now();
            while flag.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() > Polling::IDLE {
                    return;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        Some(Polling { hot })
    }
}

impl Drop for Polling {
    /// Also runs when the graph run panics.
    fn drop(&mut self) {
        self.hot.store(false, Ordering::Release);
        POLLING.store(false, Ordering::Release);
    }
}

/// Which graph to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The padded prefill graph.
    Prefill,
    /// The one-token decode graph.
    Decode,
}

/// Executes the graphs of one program on one device with one kernel set.
pub struct Executor {
    program: Program,
    device: Device,
    set: KernelSet,
    kernels: &'static dyn Kernels,
    params: Vec<Value>,
    prefill: Plan,
    decode: Plan,
    /// Device→host reads made through [`Executor::read_f32`] and friends.
    host_reads: AtomicU64,
    /// Every row's temperature is <= 0, as the session last uploaded them: `sample` is
    /// then exactly the argmax of each row, and the sort is skipped.
    all_greedy: AtomicBool,
    /// Whether prefill runs let the kernels skip padding (when the set can).
    skip_padding: AtomicBool,
    /// Per-step wall time, when `KVC_PROFILE` is set (Flex runs ops eagerly, so the time
    /// of a step is the time of its call).
    profile: Option<std::sync::Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
}

impl Executor {
    /// Plans a verified program with its parameters (in parameter-table order) for a
    /// kernel set on a device.
    pub fn new(
        program: Program,
        params: Vec<Value>,
        device: Device,
        set: KernelSet,
    ) -> Result<Executor, RuntimeError> {
        // Only the CPU kernels read GGUF blocks; for any other set (and so every backend
        // but Flex), quantized weights become device tensors here, once.
        let params: Vec<Value> = match set {
            KernelSet::Cpu => params,
            KernelSet::Portable => params
                .into_iter()
                .map(|v| match v {
                    Value::Q(q) => {
                        Value::from_f32(q.to_f32(), &[q.rows as u32, q.cols as u32], &device)
                    }
                    other => other,
                })
                .collect(),
        };
        if set.kernels().skips_padding() {
            large_buffers_from_fresh_pages();
        }
        let prefill = Plan::new(&program, &program.prefill, set, &device, &params)?;
        let decode = Plan::new(&program, &program.decode, set, &device, &params)?;
        let profile = std::env::var_os("KVC_PROFILE").map(|_| Default::default());
        Ok(Executor {
            program,
            device,
            set,
            kernels: set.kernels(),
            params,
            prefill,
            decode,
            host_reads: AtomicU64::new(0),
            all_greedy: AtomicBool::new(false),
            skip_padding: AtomicBool::new(true),
            profile,
        })
    }

    /// Tells the executor whether every row's uploaded temperature is <= 0 (the session
    /// knows, having uploaded them): `sample` then computes only the argmax it would pick.
    /// Returns the previous value.
    pub fn set_all_greedy(&self, all: bool) -> bool {
        self.all_greedy.swap(all, Ordering::Relaxed)
    }

    /// Whether prefill runs let the kernels skip padding (on by default; the set must
    /// [skip it](Kernels::skips_padding) too): off, every padding position is computed, as
    /// the portable set does. What a run computes for real tokens is the same either way.
    /// Returns the previous value.
    pub fn set_skip_padding(&self, on: bool) -> bool {
        self.skip_padding.swap(on, Ordering::Relaxed)
    }

    /// Whether prefill runs skip padding ([`Executor::set_skip_padding`] and the set).
    pub fn skips_padding(&self) -> bool {
        self.skip_padding.load(Ordering::Relaxed) && self.kernels.skips_padding()
    }

    /// The parameters in parameter-table order, as the plans read them.
    pub fn params(&self) -> &[Value] {
        &self.params
    }

    /// The program being executed.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernel set the plans use.
    pub fn kernel_set(&self) -> KernelSet {
        self.set
    }

    /// The plan of one graph.
    pub fn plan(&self, which: Which) -> &Plan {
        match which {
            Which::Prefill => &self.prefill,
            Which::Decode => &self.decode,
        }
    }

    /// Device→host reads so far.
    pub fn host_reads(&self) -> u64 {
        self.host_reads.load(Ordering::Relaxed)
    }

    /// Reads an F32 value back to the host (counted).
    pub fn read_f32(&self, v: &Value) -> Result<Vec<f32>, RuntimeError> {
        self.host_reads.fetch_add(1, Ordering::Relaxed);
        v.read_f32()
    }

    /// Reads an integer value back to the host (counted).
    pub fn read_i32(&self, v: &Value) -> Result<Vec<i32>, RuntimeError> {
        self.host_reads.fetch_add(1, Ordering::Relaxed);
        v.read_i32()
    }

    /// Reads a Bool value back to the host (counted).
    pub fn read_bool(&self, v: &Value) -> Result<Vec<bool>, RuntimeError> {
        self.host_reads.fetch_add(1, Ordering::Relaxed);
        v.read_bool()
    }

    /// Runs one graph: reads `inputs` (in declaration order) and the state, writes the
    /// state back into its buffers, and returns the outputs in declaration order.
    pub fn run(&self, which: Which, inputs: Vec<Value>, state: &mut State) -> Vec<Value> {
        if !self.kernels.run_on_pool() {
            return self.run_here(which, inputs, state);
        }
        let body = || {
            let _polling = Polling::start();
            self.run_here(which, inputs, state)
        };
        if rayon::current_thread_index().is_none() {
            rayon::scope(|_| body())
        } else {
            body()
        }
    }

    fn run_here(&self, which: Which, inputs: Vec<Value>, state: &mut State) -> Vec<Value> {
        let plan = self.plan(which);
        // Each row's real-token count, read once per run, for the kernels that skip
        // padding (a host slice on the sets that do: no device synchronisation).
        let lens: Option<Vec<usize>> = match plan.lengths {
            Some(Lengths::Input(l)) if self.skips_padding() => Some(
                inputs[l]
                    .read_i32()
                    .expect("a verified graph's len input is i32")
                    .into_iter()
                    .map(|n| n.max(0) as usize)
                    .collect(),
            ),
            Some(Lengths::NotDone(s)) if self.skips_padding() => Some(
                state.values[s.0 as usize]
                    .as_ref()
                    .expect("state present")
                    .read_bool()
                    .expect("a verified program's done state is bool")
                    .into_iter()
                    .map(|done| usize::from(!done))
                    .collect(),
            ),
            _ => None,
        };
        let mut inputs: Vec<Option<Value>> = inputs.into_iter().map(Some).collect();
        let mut env: Vec<Option<Value>> = vec![None; plan.steps.len()];
        for (i, step) in plan.steps.iter().enumerate() {
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            let mut args = step.args.iter().map(|&a| match a {
                Arg::Move(s) => env[s].take().expect("value consumed once"),
                Arg::Share(s) => env[s].clone().expect("value defined before use"),
            });
            let out = match &step.kernel {
                Kernel::Input(k) => inputs[*k].take().expect("each input read once after CSE"),
                Kernel::Param(p) => self.params[*p].clone(),
                Kernel::State { id, take } => {
                    let slot = &mut state.values[id.0 as usize];
                    if *take {
                        slot.take().expect("state read once per graph")
                    } else {
                        slot.clone().expect("state present")
                    }
                }
                Kernel::Const(v) => v.clone(),
                kernel => {
                    let args: Vec<Value> = args.by_ref().collect();
                    let live = lens
                        .as_deref()
                        .zip(step.rows)
                        .map(|(lens, rows)| Live { lens, rows });
                    self.compute(kernel, args, live)
                }
            };
            drop(args);
            if let (Some(p), Some(t)) = (&self.profile, started) {
                let mut p = p.lock().expect("profile lock");
                let e = p.entry(step.label.clone()).or_default();
                e.0 += 1;
                e.1 += t.elapsed().as_secs_f64();
            }
            env[i] = Some(out);
        }
        for w in &plan.writebacks {
            match *w {
                WriteBack::InPlace { state: s, slot } => {
                    state.values[s.0 as usize] = env[slot].take();
                }
                WriteBack::Assign { state: s, slot } => {
                    let v = env[slot].clone().expect("update defined");
                    state.write(s, v);
                }
            }
        }
        debug_assert!(state.values.iter().all(Option::is_some), "a state was lost");
        plan.outputs
            .iter()
            .map(|&o| env[o].clone().expect("output defined"))
            .collect()
    }

    /// One compute step (every kernel but inputs, parameters, state and constants);
    /// `live`: the real tokens of the step's value, when padding may be skipped.
    fn compute(&self, kernel: &Kernel, args: Vec<Value>, live: Option<Live<'_>>) -> Value {
        let k = self.kernels;
        let mut a = args.into_iter();
        let mut next = move || a.next().expect("verified arity");
        match kernel {
            Kernel::Input(_) | Kernel::Param(_) | Kernel::State { .. } | Kernel::Const(_) => {
                unreachable!("handled by the run loop")
            }
            Kernel::Embed(dims) => {
                let (t, ids) = (next().f(), next().i());
                let [_, _, v, h] = t.dims();
                let n = ids.shape().num_elements();
                let rows = t.reshape([v, h]).select(0, ids.reshape([n]));
                Value::F(to_f32(rows).reshape(*dims))
            }
            Kernel::QEmbed(dims) => {
                let (t, ids) = (next().q(), next().i());
                Value::F(k.qembed(&t, ids, live).reshape(*dims))
            }
            Kernel::QLinear(dims, form) => {
                let (x, w) = (next().f(), next().q());
                let m = x.shape().num_elements() / w.cols;
                let y = k.qlinear(x.reshape([m, w.cols]), &w, *form, live);
                Value::F(y.reshape(*dims))
            }
            Kernel::Linear(dims, form) => {
                let (x, w) = (next().f(), next().f());
                let [_, _, n, kk] = w.dims();
                let m = x.shape().num_elements() / kk;
                let y = k.linear(x.reshape([m, kk]), w.reshape([n, kk]), *form, live);
                Value::F(y.reshape(*dims))
            }
            Kernel::RmsNorm(eps) => Value::F(k.rms_norm(next().f(), next().f(), *eps, live)),
            Kernel::Rope(cos, sin) => {
                let (x, pos) = (next().f(), next().i());
                Value::F(k.rope(x, pos, (cos.clone(), sin.clone()), live))
            }
            Kernel::Attention(scale, form) => {
                let (q, kk, v, mask) = (next().f(), next().f(), next().f(), next().b());
                Value::F(k.attention(q, kk, v, mask, *scale, *form, live))
            }
            Kernel::AttentionProbs(scale) => {
                let (q, kk, mask) = (next().f(), next().f(), next().b());
                Value::F(k.attention_probs(q, kk, mask, *scale, live))
            }
            Kernel::AttentionValues(form) => {
                Value::F(k.attention_values(next().f(), next().f(), *form, live))
            }
            Kernel::AttentionMass(kv_heads) => {
                Value::F(attention_mass(next().f(), next().f(), *kv_heads))
            }
            Kernel::KvWrite => {
                let (cache, new) = (next(), next());
                k.kv_write(cache, new, next().i(), next().i())
            }
            Kernel::Silu => Value::F(k.silu(next().f(), live)),
            Kernel::Gelu => Value::F(k.gelu(next().f(), live)),
            Kernel::Binary(op, dims) => match (next(), next(), live) {
                (Value::F(a), Value::F(b), Some(live))
                    if ieee_op(*op).is_some() && a.dims() == *dims && b.dims() == *dims =>
                {
                    Value::F(k.binary(*op, a, b, live))
                }
                (a, b, _) => binary(*op, a, b, *dims),
            },
            Kernel::Not => Value::B(next().b().bool_not()),
            Kernel::IsIn(values) => {
                let x = next().i();
                // Equal to nothing: x ≠ x is false everywhere.
                let none = x.clone().not_equal(x.clone());
                Value::B(
                    values
                        .iter()
                        .fold(none, |acc, &v| acc.bool_or(x.clone().equal_elem(v))),
                )
            }
            Kernel::Select(dims) => {
                let c = next().b().expand(*dims);
                match (next(), next()) {
                    (Value::F(a), Value::F(b)) => {
                        Value::F(b.expand(*dims).mask_where(c, a.expand(*dims)))
                    }
                    (Value::I(a), Value::I(b)) => {
                        Value::I(b.expand(*dims).mask_where(c, a.expand(*dims)))
                    }
                    (Value::B(a), Value::B(b)) => {
                        Value::B(b.expand(*dims).mask_where(c, a.expand(*dims)))
                    }
                    (a, b) => unreachable!("verified select: {a:?} vs {b:?}"),
                }
            }
            Kernel::Cast(dtype) => match (next(), dtype, live) {
                (Value::F(t), DType::F16, Some(live)) if t.dtype() == burn::tensor::DType::F32 => {
                    Value::F(k.to_f16(t, live))
                }
                (v, _, _) => cast(v, *dtype),
            },
            Kernel::Reshape(dims) => match next() {
                Value::F(t) => Value::F(t.reshape(*dims)),
                Value::I(t) => Value::I(t.reshape(*dims)),
                Value::B(t) => Value::B(t.reshape(*dims)),
                Value::Q(_) => unreachable!("verified graph: blocks are not reshaped"),
            },
            Kernel::Permute(axes) => match next() {
                Value::F(t) => match live {
                    Some(live) => Value::F(k.permute(t, *axes, live)),
                    None => Value::F(t.permute(*axes)),
                },
                Value::I(t) => Value::I(t.permute(*axes)),
                Value::B(t) => Value::B(t.permute(*axes)),
                Value::Q(_) => unreachable!("verified graph: blocks are not permuted"),
            },
            Kernel::TakeRow(dims) => {
                let x = next().f();
                let [_, b, t, h] = x.dims();
                let idx = next().i().reshape([1, b, 1, 1]).clamp(0, t as i32 - 1);
                let rows = x.gather(2, idx.expand([1, b, 1, h]));
                Value::F(rows.reshape(*dims))
            }
            Kernel::Sample(dims) => {
                let (l, t) = (next().f(), next().f());
                let (kk, p, u) = (next().i(), next().f(), next().f());
                if self.all_greedy.load(Ordering::Relaxed) {
                    // What `sample` returns when every temperature is <= 0.
                    Value::I(l.argmax(3).reshape(*dims))
                } else {
                    Value::I(sample(l, t, kk, p, u).reshape(*dims))
                }
            }
            Kernel::Argmax(dims) => Value::I(next().f().argmax(3).reshape(*dims)),
            Kernel::Gather { rows } => {
                let (x, index) = (next(), next().i());
                match (x, rows) {
                    (Value::F(t), true) => Value::F(gather_rows(t, index)),
                    (Value::I(t), true) => Value::I(gather_rows(t, index)),
                    (Value::B(t), true) => Value::B(gather_rows(t, index)),
                    (Value::F(t), false) => Value::F(t.gather(3, index)),
                    (Value::I(t), false) => Value::I(t.gather(3, index)),
                    (Value::B(t), false) => Value::B(t.int().gather(3, index).bool()),
                    (Value::Q(_), _) => unreachable!("verified graph: blocks are not gathered"),
                }
            }
            Kernel::TopK(kk) => Value::I(k.top_k(next().f(), next().i(), *kk)),
            Kernel::Sum(dims) => Value::F(next().f().sum_dim(3).reshape(*dims)),
            Kernel::Hash(seed, dims) => {
                let (a, b) = (next().i().expand(*dims), next().i().expand(*dims));
                Value::F(k.hash(a, b, *seed))
            }
            Kernel::AbsMax => Value::F(next().f().abs().max_dim(3)),
            Kernel::Quantize(dims) => {
                let x = next().f();
                let scale = next().f().expand(*dims);
                let q = x.div(scale).round().clamp(-127.0, 127.0);
                Value::I(q.int().cast(IntDType::I8))
            }
        }
    }
}

impl Executor {
    /// Prints the per-step times gathered since the last report (when `KVC_PROFILE` is
    /// set) under `phase`, and starts gathering anew: a caller separates phases (prefill,
    /// decode steps, refills) this way. Dropping the executor reports what is left.
    pub fn report_profile(&self, phase: &str) {
        let Some(p) = &self.profile else { return };
        let p = std::mem::take(&mut *p.lock().expect("profile lock"));
        if p.is_empty() {
            return;
        }
        let total: f64 = p.values().map(|v| v.1).sum();
        eprintln!(
            "kvc profile (KVC_PROFILE, {} kernels, {phase}): {total:.3} s in ops",
            self.set.name()
        );
        let mut rows: Vec<_> = p.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        for (name, (calls, secs)) in rows {
            eprintln!(
                "  {name:<32} {calls:>8} calls {:>9.3} s {:>5.1}%",
                secs,
                100.0 * secs / total.max(1e-12)
            );
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.report_profile("until dropped");
    }
}
