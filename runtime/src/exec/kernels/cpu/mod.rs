//! The CPU kernel set ([`Cpu`]): kernels on Flex's host buffers, used where Flex's general
//! ops pay a fixed cost per call that a decode step cannot afford (a projection of one
//! row, one query's attention), and the portable ops elsewhere. A plan chooses this set
//! only for Flex devices, so every tensor these kernels see is a Flex tensor.

use burn::tensor::{Bool, DType as BurnDType, Int, Tensor, TensorData, kind::Basic};
use burn_flex::{Flex, FlexTensor};

use super::portable::{self, Portable};
use kvc_compiler::ir::BinaryOp;

use super::{Form, Kernels, Live, ieee_op, top_k_host};
use crate::blocks::{QuantLayout, QuantTensor};
use crate::exec::value::{Value, to_f32};
use isa::Isa;

/// Defines `$name` to run `$body` compiled for AVX-512 (F, BW, VL) or AVX2 + FMA (each
/// with F16C), as [`isa::Isa::best`] says (the crate is built for baseline x86-64), else as
/// built. The function may take one type parameter with one bound.
macro_rules! multiversion {
    ($(#[$meta:meta])* unsafe fn $name:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$meta])*
        unsafe fn $name $(<$g: $bound>)? ($($arg: $ty),*) {
            #[inline(always)]
            unsafe fn body $(<$g: $bound>)? ($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) {
                    // SAFETY: the caller's contract.
                    unsafe { body($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) {
                    // SAFETY: the caller's contract.
                    unsafe { body($($arg),*) }
                }
                match $crate::exec::kernels::cpu::isa::Isa::best() {
                    // SAFETY: the features were detected; the caller's contract.
                    $crate::exec::kernels::cpu::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::exec::kernels::cpu::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::exec::kernels::cpu::isa::Isa::Portable => {}
                }
            }
            // SAFETY: the caller's contract.
            unsafe { body($($arg),*) }
        }
    };
}

/// A raw pointer that parallel tasks may share, each writing elements no other task
/// touches (every use states which).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

// SAFETY: users write disjoint elements from parallel tasks (see each call site).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The address `offset` elements in (a method, so closures capture the `Send` wrapper).
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Rows up to which a projection runs in [`gemv`] (decode at batch ≤ 16): each weight is
/// streamed once for all rows on both cores. Larger products run Flex's GEMM.
pub const GEMV_ROWS: usize = 16;

/// Query rows per KV head (`g·T`) up to which attention is a few-row (decode) problem
/// for [`attention::attention`]; longer chunks run [`attention::chunk`].
pub const FEW_ROWS: usize = 16;

/// kvc's CPU kernels on Flex buffers.
pub struct Cpu;

impl Kernels for Cpu {
    fn run_on_pool(&self) -> bool {
        rayon::current_num_threads() > 1
    }

    fn linear_form(&self, m: usize) -> Form {
        if m > GEMV_ROWS {
            Form::Gemm
        } else {
            Form::Gemv
        }
    }

    fn qlinear_form(&self, m: usize, w: &QuantTensor) -> Form {
        let isa = Isa::best();
        let interleaved = w.layout == QuantLayout::Interleaved;
        let method = if interleaved {
            quant::Method::Int8
        } else {
            quant::method(isa, m)
        };
        Form::Blocks {
            path: quant::Path { isa, method },
            interleaved,
        }
    }

    fn attention_form(&self, rows: usize) -> Form {
        if rows <= FEW_ROWS {
            Form::FewRows
        } else {
            Form::Chunk
        }
    }

    fn skips_padding(&self) -> bool {
        true
    }

    fn linear(&self, x: Tensor<2>, w: Tensor<2>, form: Form, live: Option<Live<'_>>) -> Tensor<2> {
        let [m, k] = x.dims();
        let [n, _] = w.dims();
        if let Some(live) = live.filter(|l| !l.all()) {
            let xt = host(&x);
            let rows = live.unit_runs(n);
            let device = x.device();
            let out = live_product(
                f32s(&xt),
                [m, k, n],
                &rows,
                compact_floor(form, m),
                |xc, mc, out| {
                    let xc = Tensor::<2>::from_data(TensorData::new(xc.to_vec(), [mc, k]), &device);
                    let y = self.linear(xc, w, form, None);
                    out.copy_from_slice(f32s(&host(&y)));
                },
            );
            return pool::tensor(out, [m, n]);
        }
        match form {
            // Flex has no fast f16 GEMM on CPUs without AVX512-FP16: widen the weights for
            // the product (a copy of one matrix, small next to an M > 16 product).
            Form::Gemm => return to_f32(x.matmul(widen(w).transpose())),
            Form::Gemv => {}
            other => unreachable!("linear has no form {other:?}"),
        }
        let (xt, wt) = (host(&x), flex(&w));
        let xs = f32s(&xt);
        let mut out = pool::floats(m * n);
        match wt.as_slice::<f32>() {
            Some(ws) => gemv::matmul_t(xs, m, k, ws, n, &mut out),
            None => {
                let ws = wt.as_slice::<half::f16>().expect("weights are f32 or f16");
                gemv::matmul_t(xs, m, k, ws, n, &mut out)
            }
        }
        pool::tensor(out, [m, n])
    }

    fn rms_norm(&self, x: Tensor<4>, w: Tensor<4>, eps: f32, live: Option<Live<'_>>) -> Tensor<4> {
        let xt = host(&x);
        let xs = f32s(&xt);
        let out = elementwise::rms_norm(xs, f32s(&host(&w)), eps, &runs(live, xs.len()));
        pool::tensor(out, x.dims())
    }

    fn rope(
        &self,
        x: Tensor<4>,
        pos: Tensor<4, Int>,
        (cos, sin): (Tensor<2>, Tensor<2>),
        live: Option<Live<'_>>,
    ) -> Tensor<4> {
        let [b, t, n, d] = x.dims();
        let rows = match live {
            Some(live) => live.unit_runs(n * d),
            None => std::iter::once(0..b * t).collect(),
        };
        let (pt, ct, st) = (host(&pos), host(&cos), host(&sin));
        let tables = (f32s(&ct), f32s(&st));
        let in_place = |xs: &mut [f32], _: Live<'_>| {
            elementwise::rope_in_place(xs, i32s(&pt), (n, d), tables, &rows)
        };
        let x = match in_place_live(x, live, in_place) {
            Ok(done) => return done,
            Err(x) => x,
        };
        let xt = host(&x);
        let out = elementwise::rope(f32s(&xt), i32s(&pt), (n, d), tables, &rows);
        pool::tensor(out, x.dims())
    }

    fn silu(&self, x: Tensor<4>, live: Option<Live<'_>>) -> Tensor<4> {
        activation(x, live, elementwise::silu_in_place, elementwise::silu)
    }

    fn qlinear(
        &self,
        x: Tensor<2>,
        w: &QuantTensor,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<2> {
        let [m, k] = x.dims();
        let xt = host(&x);
        if let Some(live) = live.filter(|l| !l.all()) {
            let rows = live.unit_runs(w.rows);
            let floor = compact_floor(form, m);
            let out = live_product(f32s(&xt), [m, k, w.rows], &rows, floor, |xc, mc, out| {
                qlinear_host(xc, mc, k, w, form, out)
            });
            return pool::tensor(out, [m, w.rows]);
        }
        let mut out = pool::floats(m * w.rows);
        qlinear_host(f32s(&xt), m, k, w, form, &mut out);
        pool::tensor(out, [m, w.rows])
    }

    fn qembed(
        &self,
        table: &QuantTensor,
        ids: Tensor<4, Int>,
        live: Option<Live<'_>>,
    ) -> Tensor<2> {
        let it = host(&ids);
        let ids = i32s(&it);
        let h = table.cols;
        let mut out = pool::floats(ids.len() * h);
        let runs = match live {
            Some(live) => live.unit_runs(h),
            None => std::iter::once(0..ids.len()).collect(),
        };
        for i in runs.into_iter().flatten() {
            // Ids come from the tokenizer or the sampler; clamp like the f32 lookup's
            // bounds so a bad id cannot read outside the table.
            let r = (ids[i].max(0) as usize).min(table.rows - 1);
            out[i * h..][..h].copy_from_slice(&table.row_f32(r));
        }
        pool::tensor(out, [ids.len(), h])
    }

    fn gelu(&self, x: Tensor<4>, live: Option<Live<'_>>) -> Tensor<4> {
        activation(x, live, elementwise::gelu_in_place, elementwise::gelu)
    }

    fn binary(&self, op: BinaryOp, a: Tensor<4>, b: Tensor<4>, live: Live<'_>) -> Tensor<4> {
        let Some(f) = ieee_op(op) else {
            return Portable.binary(op, a, b, live);
        };
        if a.dtype() != BurnDType::F32 || b.dtype() != BurnDType::F32 {
            return Portable.binary(op, a, b, live);
        }
        let bt = host(&b);
        let in_place =
            |xs: &mut [f32], l: Live<'_>| elementwise::binary_in_place(xs, f32s(&bt), f, &l.runs());
        let a = match in_place_live(a, Some(live), in_place) {
            Ok(done) => return done,
            Err(a) => a,
        };
        let at = host(&a);
        let out = elementwise::binary(f32s(&at), f32s(&bt), f, &live.runs());
        pool::tensor(out, a.dims())
    }

    fn to_f16(&self, x: Tensor<4>, live: Live<'_>) -> Tensor<4> {
        use half::slice::HalfFloatSliceExt;
        use half::vec::HalfBitsVecExt;
        let xt = host(&x);
        let xs = f32s(&xt);
        // Zeroed as integers, so that the allocator hands out untouched zero pages (a
        // `vec![f16::ZERO; n]` writes every element: 1.4 ms per call at batch 16 and
        // T = 512, a quarter of a one-row refill).
        let mut out: Vec<half::f16> = vec![0u16; xs.len()].reinterpret_into();
        for r in live.runs() {
            out[r.clone()].convert_from_f32_slice(&xs[r]);
        }
        // Built on Flex directly: `Tensor::from_data` would store the device's float type.
        Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(out, x.dims())))
    }

    fn permute(&self, x: Tensor<4>, axes: [usize; 4], live: Live<'_>) -> Tensor<4> {
        if x.dtype() != BurnDType::F32 || live.all() {
            return x.permute(axes);
        }
        let dims = x.dims();
        let xt = host(&x);
        let out = elementwise::permute(f32s(&xt), dims, axes, &live.unit_runs(dims[axes[3]]));
        pool::tensor(out, axes.map(|a| dims[a]))
    }

    fn attention(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<4> {
        let q_dims = q.dims();
        let real = live.map(|l| l.lens);
        let dims = dims(&q, &k, &mask, scale);
        let (qt, kt, vt, mt) = (host(&q), host(&k), host(&v), host(&mask));
        let mut out = pool::floats(q.dims().iter().product());
        let (q, mask) = (f32s(&qt), bool_bytes(&mt));
        let few = match form {
            Form::FewRows => true,
            Form::Chunk => false,
            other => unreachable!("attention has no form {other:?}"),
        };
        match kt.dtype() {
            BurnDType::F16 => {
                host_attention(few, q, f16s(&kt), f16s(&vt), mask, (dims, real), &mut out)
            }
            _ => host_attention(few, q, f32s(&kt), f32s(&vt), mask, (dims, real), &mut out),
        }
        pool::tensor(out, q_dims)
    }

    fn attention_probs(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        live: Option<Live<'_>>,
    ) -> Tensor<4> {
        // kvc's row kernel at every size: Burn's softmax over the masked `[B, Hkv, g·T, S]`
        // scores of a long chunk spends most of its time in libm's underflow path for the
        // hidden slots (perf: `xflowf`), and a causal chunk hides half of them. Measured on
        // a one-chunk 1,501-token SmolLM2 H2O prefill: 11.1 s → 5.0 s over 30 layers.
        let [b, hq, t, _] = q.dims();
        let s = k.dims()[2];
        let dims = dims(&q, &k, &mask, scale);
        let (qt, kt, mt) = (host(&q), host(&k), host(&mask));
        // Always new, not from `pool`: its padding rows must be 0, since `attention_mass`
        // weighs every query row (0 · stale Inf would be NaN in a real row's score).
        let mut p = vec![0.0f32; b * hq * t * s];
        let (qs, mask) = (f32s(&qt), bool_bytes(&mt));
        let real = live.map(|l| l.lens);
        match kt.dtype() {
            BurnDType::F16 => attention::probs(qs, f16s(&kt), mask, dims, real, &mut p),
            _ => attention::probs(qs, f32s(&kt), mask, dims, real, &mut p),
        }
        Tensor::from_data(TensorData::new(p, [b, hq, t, s]), &q.device())
    }

    fn attention_values(
        &self,
        probs: Tensor<4>,
        v: Tensor<4>,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<4> {
        let [b, hq, t, s] = probs.dims();
        let [_, hkv, _, d] = v.dims();
        let real = live.map(|l| l.lens);
        match form {
            // Burn's batched matmul is as fast over long chunks; over the batch rows with
            // real positions only.
            Form::Chunk => return batch_rows_values(probs, v, real),
            Form::FewRows => {}
            other => unreachable!("attention_values has no form {other:?}"),
        }
        let (pt, vt) = (host(&probs), host(&v));
        let mut out = pool::floats(b * hq * t * d);
        let (ps, shape) = (f32s(&pt), [b, hq, t, s]);
        match vt.dtype() {
            BurnDType::F16 => attention::values(ps, f16s(&vt), shape, (hkv, real), &mut out),
            _ => attention::values(ps, f32s(&vt), shape, (hkv, real), &mut out),
        }
        pool::tensor(out, [b, hq, t, d])
    }

    fn kv_write(
        &self,
        cache: Value,
        new: Value,
        start: Tensor<4, Int>,
        len: Tensor<4, Int>,
    ) -> Value {
        match (cache, new) {
            (Value::F(c), Value::F(n)) => Value::F(host_kv_write(c, &n, &start, &len)),
            (c, n) => Portable.kv_write(c, n, start, len),
        }
    }

    fn top_k(&self, x: Tensor<4>, tiebreak: Tensor<4, Int>, k: usize) -> Tensor<4, Int> {
        let dims = x.dims();
        let n = dims[3];
        let idx = top_k_host(f32s(&host(&x)), i32s(&host(&tiebreak)), n, k);
        let out = [dims[0], dims[1], dims[2], k];
        Tensor::from_data(TensorData::new(idx, out), &x.device())
    }

    fn hash(&self, a: Tensor<4, Int>, b: Tensor<4, Int>, seed: u32) -> Tensor<4> {
        let dims = a.dims();
        let (at, bt) = (host(&a), host(&b));
        let u: Vec<f32> = i32s(&at)
            .iter()
            .zip(i32s(&bt))
            .map(|(&a, &b)| super::hash_uniform(seed, a, b))
            .collect();
        Tensor::from_data(TensorData::new(u, dims), &a.device())
    }
}

/// `f` applied to x's own elements, when padding may be skipped (`live`) and x is a whole
/// contiguous f32 tensor that nothing else holds (a value moved into its last reader): a
/// kernel then writes its real elements there instead of taking an output buffer of the
/// full padded shape. Else x back, untouched.
// The tensor is handed back unchanged in Err, once per call: its size does not matter.
#[allow(clippy::result_large_err)]
fn in_place_live(
    x: Tensor<4>,
    live: Option<Live<'_>>,
    f: impl FnOnce(&mut [f32], Live<'_>),
) -> Result<Tensor<4>, Tensor<4>> {
    let Some(live) = live else {
        return Err(x);
    };
    let n: usize = x.dims().iter().product();
    if x.dtype() != BurnDType::F32 {
        return Err(x);
    }
    let mut t = x
        .try_into_primitive::<Flex>()
        .unwrap_or_else(|_| unreachable!("the CPU kernel set runs on Flex tensors only"));
    let whole = t.layout().contiguous_offsets() == Some((0, n));
    match t.try_storage_mut::<f32>() {
        Some(xs) if whole => {
            f(xs, live);
            Ok(Tensor::from_primitive::<Flex>(t))
        }
        _ => Err(Tensor::from_primitive::<Flex>(t)),
    }
}

/// An elementwise activation: over `live`'s runs in x's own buffer when x is moved into
/// it (`in_place`), else into a new buffer (`fresh`, over `live`'s runs or all of x).
fn activation(
    x: Tensor<4>,
    live: Option<Live<'_>>,
    in_place_f: fn(&mut [f32], &[std::ops::Range<usize>]),
    fresh: fn(&[f32], &[std::ops::Range<usize>]) -> Vec<f32>,
) -> Tensor<4> {
    let x = match in_place_live(x, live, |xs, l| in_place_f(xs, &l.runs())) {
        Ok(done) => return done,
        Err(x) => x,
    };
    let xt = host(&x);
    let xs = f32s(&xt);
    let out = fresh(xs, &runs(live, xs.len()));
    pool::tensor(out, x.dims())
}

/// `live`'s element runs, or the one run over all `n` elements.
fn runs(live: Option<Live<'_>>, n: usize) -> Vec<std::ops::Range<usize>> {
    match live {
        Some(live) => live.runs(),
        None => std::iter::once(0..n).collect(),
    }
}

/// The fewest rows a product in `form` planned for `m` rows may run over and still compute
/// each row as the planned product does, bit for bit: the forms switch paths at some row
/// counts (Flex's GEMM runs a GEMV at one row; the int8 kernels, [`quant::min_rows`], run
/// fused tiles up to four rows and grouped passes above).
fn compact_floor(form: Form, m: usize) -> usize {
    match form {
        Form::Gemm => GEMV_ROWS + 1,
        Form::Blocks { path, interleaved } => quant::min_rows(path, interleaved, m),
        Form::Gemv | Form::Burn | Form::FewRows | Form::Chunk => 1,
    }
}

/// `product(x', m', out')` over the real rows `rows` of x `[m, k]` only, gathered into
/// x' (with zero rows up to `floor`), and its rows scattered back into an output buffer
/// `[m, n]` ([`pool::floats`]; padding rows keep what it held): a product's cost follows
/// its real rows. Where `floor` leaves no fewer rows to run, the product runs over x as
/// planned (its padding rows computed from x's).
fn live_product(
    x: &[f32],
    [m, k, n]: [usize; 3],
    rows: &[std::ops::Range<usize>],
    floor: usize,
    product: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Vec<f32> {
    let mut out = pool::floats(m * n);
    let live: usize = rows.iter().map(|r| r.len()).sum();
    if live == 0 {
        return out;
    }
    let mc = live.max(floor);
    if mc >= m {
        // No fewer rows to run: the product over x as planned.
        product(x, m, &mut out);
        return out;
    }
    let mut xc = vec![0.0f32; mc * k];
    let mut at = 0;
    for r in rows {
        xc[at * k..(at + r.len()) * k].copy_from_slice(&x[r.start * k..r.end * k]);
        at += r.len();
    }
    let mut oc = vec![0.0f32; mc * n];
    product(&xc, mc, &mut oc);
    at = 0;
    for r in rows {
        out[r.start * n..r.end * n].copy_from_slice(&oc[at * n..(at + r.len()) * n]);
        at += r.len();
    }
    out
}

/// [`Kernels::qlinear`] on host slices: x `[m, k]` into out `[m, w.rows]`.
fn qlinear_host(x: &[f32], m: usize, k: usize, w: &QuantTensor, form: Form, out: &mut [f32]) {
    let Form::Blocks { path, interleaved } = form else {
        unreachable!("q_linear has no form {form:?}")
    };
    assert_eq!(
        interleaved,
        w.layout == QuantLayout::Interleaved,
        "planned for another layout"
    );
    let (bytes, ty, n) = (&w.bytes, w.ty, w.rows);
    if interleaved {
        quant::qmatmul_t_interleaved_with(path.isa, x, m, k, bytes, ty, n, out)
    } else {
        quant::qmatmul_t_with(path, x, m, k, bytes, ty, n, out)
    }
}

/// The attention shapes of q `[B, Hq, T, D]`, k `[B, Hkv, S, D]`, mask `[B, M, T, S]`.
fn dims(q: &Tensor<4>, k: &Tensor<4>, mask: &Tensor<4, Bool>, scale: f32) -> attention::Dims {
    let [b, hq, t, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    attention::Dims {
        scale,
        b,
        hq,
        hkv,
        t,
        s,
        d,
        m: mask.dims()[1],
    }
}

/// Attention on host slices: the few-row (decode) kernel when `few`, else the chunk
/// (prefill) kernel; `real` as the kernels take it.
fn host_attention<E: attention::KvElem>(
    few: bool,
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    (dims, real): (attention::Dims, Option<&[usize]>),
    out: &mut [f32],
) {
    let run = if few {
        attention::attention::<E>
    } else {
        attention::chunk::<E>
    };
    run(q, k, v, mask, dims, real, out)
}

/// Burn's `probs · v` ([`Portable`]) over the batch rows that have real positions
/// (`real`), gathered together; the other rows hold what the output buffer held
/// ([`pool::floats`]).
fn batch_rows_values(probs: Tensor<4>, v: Tensor<4>, real: Option<&[usize]>) -> Tensor<4> {
    let [b, hq, t, _] = probs.dims();
    let d = v.dims()[3];
    let rows: Vec<usize> = match real {
        Some(r) => (0..b).filter(|&i| r[i] > 0).collect(),
        None => (0..b).collect(),
    };
    if rows.len() == b {
        return Portable.attention_values(probs, v, Form::Burn, None);
    }
    let device = probs.device();
    let mut out = pool::floats(b * hq * t * d);
    if !rows.is_empty() {
        let ids: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows.len()]), &device);
        let (p, v) = (probs.select(0, idx.clone()), v.select(0, idx));
        let y = Portable.attention_values(p, v, Form::Burn, None);
        let yt = host(&y);
        let per = hq * t * d;
        for (j, &i) in rows.iter().enumerate() {
            out[i * per..(i + 1) * per].copy_from_slice(&f32s(&yt)[j * per..(j + 1) * per]);
        }
    }
    pool::tensor(out, [b, hq, t, d])
}

/// [`cache::kv_write`] of an F32 cache in place on its buffer when the cache has a single
/// owner and is whole and contiguous; otherwise Burn's scatter (which copies a shared
/// cache).
fn host_kv_write(
    cache: Tensor<4>,
    new: &Tensor<4>,
    start: &Tensor<4, Int>,
    len: &Tensor<4, Int>,
) -> Tensor<4> {
    let dims = cache.dims();
    let mut prim = flex(&cache);
    drop(cache);
    let whole = prim.layout().contiguous_offsets() == Some((0, dims.iter().product()));
    let t = new.dims()[2];
    let (nt, st, lt) = (host(new), host(start), host(len));
    let (st, lt) = (i32s(&st), i32s(&lt));
    let written = whole
        && match prim.dtype() {
            BurnDType::F16 => match (prim.try_storage_mut::<half::f16>(), nt.as_slice()) {
                (Some(c), Some(n)) => {
                    cache::kv_write(c, n, st, lt, dims, t);
                    true
                }
                _ => false,
            },
            _ => match prim.try_storage_mut::<f32>() {
                Some(c) => {
                    cache::kv_write(c, f32s(&nt), st, lt, dims, t);
                    true
                }
                None => false,
            },
        };
    let cache = Tensor::from_primitive::<Flex>(prim);
    if written {
        cache
    } else {
        portable::kv_write(cache, new.clone(), start.clone(), len.clone())
    }
}

/// The Flex tensor of a tensor on the Flex device (a plan chooses this kernel set only
/// there).
fn flex<const D: usize, K>(x: &Tensor<D, K>) -> FlexTensor
where
    K: Basic + burn::tensor::BackendPrimitive<Flex, Primitive = FlexTensor>,
{
    x.clone()
        .try_into_primitive::<Flex>()
        .unwrap_or_else(|_| unreachable!("the CPU kernel set runs on Flex tensors only"))
}

/// A contiguous Flex view of a tensor (copied only if it is a strided view).
fn host<const D: usize, K>(x: &Tensor<D, K>) -> FlexTensor
where
    K: Basic + burn::tensor::BackendPrimitive<Flex, Primitive = FlexTensor>,
{
    let t = flex(x);
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a contiguous Flex tensor of a verified graph's f32 value.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .unwrap_or_else(|| unreachable!("expected contiguous f32, found {:?}", t.dtype()))
}

/// The f16 elements of a contiguous Flex tensor of a verified graph's f16 cache.
fn f16s(t: &FlexTensor) -> &[half::f16] {
    t.as_slice::<half::f16>()
        .unwrap_or_else(|| unreachable!("expected contiguous f16, found {:?}", t.dtype()))
}

/// The i32 elements of a contiguous Flex tensor of a verified graph's i32 value.
fn i32s(t: &FlexTensor) -> &[i32] {
    t.as_slice::<i32>()
        .unwrap_or_else(|| unreachable!("expected contiguous i32, found {:?}", t.dtype()))
}

/// The bytes (0 or 1) of a contiguous Flex bool tensor.
fn bool_bytes(t: &FlexTensor) -> &[u8] {
    let (start, end) = t
        .layout()
        .contiguous_offsets()
        .unwrap_or_else(|| unreachable!("host() returns contiguous tensors"));
    &t.storage::<u8>()[start..end]
}

/// An F32 copy of F16 weights with `half`'s F16C slice conversion (several times faster
/// than an elementwise cast); F32 weights as they are.
fn widen(w: Tensor<2>) -> Tensor<2> {
    if w.dtype() != BurnDType::F16 {
        return w;
    }
    let t = host(&w);
    let h = t.as_slice::<half::f16>().expect("f16 weights");
    use half::slice::HalfFloatSliceExt;
    let mut out = pool::floats(h.len());
    h.convert_to_f32_slice(&mut out);
    pool::tensor(out, w.dims())
}

pub mod attention;
pub mod cache;
pub mod elementwise;
pub mod gemv;
pub mod isa;
pub(crate) mod pool;
pub mod quant;

/// Deterministic test inputs in [−1, 1) (xorshift).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests;
