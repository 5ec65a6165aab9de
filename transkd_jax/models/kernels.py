"""The ops with several forms: one for XLA:CPU, the native one, and TPU and GPU forms.

Each op computes the same function in every form (tests compare them); they
differ in what the compiler makes of them:

- 3x3 depthwise conv (Mix-FFN; dilated, LVT's RASA): ``cpu``, nine shifted
  multiply-adds with a hand-written VJP; ``native``, a grouped ``conv_general_dilated``.
- attention (MiT, GL-Mixer): ``cpu``, einsums over chunks of queries with a
  hand-written softmax VJP;
  ``native``, ``jax.nn.dot_product_attention`` (XLA's implementation);
  ``tpu``, JAX's Pallas TPU splash-attention kernel (``splash_attention``): the
  queries x keys scores never reach HBM, in the forward or the backward pass;
  ``gpu``, cuDNN's flash attention (``jax.nn.dot_product_attention`` with
  ``implementation="cudnn"``), likewise, for bfloat16 and float16 heads of at most
  128 (``cudnn_fits``; float32 runs XLA's).
- resize along one axis by PyTorch's rules (``interpolate_axis``; ``resize.py``
  applies it per axis for the head, CSF, ReviewKD, logits): ``cpu``, row gathers
  with the adjoint as gathers; ``native``, contraction with the interpolation
  matrix, as ``jax.image`` does.

One op has a single form for every platform: ``linear``, the matmul of every
dense layer (``nn.Dense(dot_general=kernels.dense_dot_general)``) and of the
SegFormer head, taken over a 2-D view of the input.

XLA:CPU runs grouped convolutions, autodiff's softmax backward and scatter-adds
slowly (docs/performance.md); TPUs and GPUs run the native ops on their
convolution and matmul units, and gathers poorly. The ``tpu`` and ``gpu`` forms
are the native one but for attention (and, on TPU, MiT's patch convolutions). The form
is chosen from the devices the program is compiled for (``resolve``, called by
``transkd_jax/build.py`` with the mesh's platform and, on NVIDIA GPUs, their
compute capability: cuDNN's flash attention needs 8.0, Ampere, or newer), never from
``jax.default_backend()``: a program compiled here for a TPU topology gets the
TPU form. ``config.kernels`` forces one. Modules take the resolved form as
their ``kernels`` attribute, default ``"native"``.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

FORMS = ("cpu", "native", "tpu", "gpu")
SETTINGS = ("auto",) + FORMS
_AUTO = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu"}  # platform -> form; any other: native
CUDNN_FLASH_CAPABILITY = (8, 0)  # cuDNN's flash attention: Ampere (A100), Hopper (H100) ...


def _capability_at_least(capability, least) -> bool:
  """Whether a CUDA compute capability ("9.0") is ``least`` or newer; False for None or
  anything else (ROCm's gfx names)."""
  try:
    return tuple(int(p) for p in str(capability).split(".")) >= least
  except ValueError:
    return False


def resolve(setting: str, platform: str, capability: str | None = None) -> str:
  """``config.kernels`` (auto | cpu | native | tpu | gpu) for devices of ``platform`` -> a form.

  ``capability``: the GPUs' CUDA compute capability (``device.compute_capability``). "auto"
  on GPUs gives the gpu form from 8.0 on, else native (a T4 or V100 has no cuDNN flash
  attention)."""
  if setting not in SETTINGS:
    raise ValueError(f"config.kernels must be one of {', '.join(SETTINGS)}, got {setting!r}")
  cudnn_flash = platform == "gpu" and _capability_at_least(capability, CUDNN_FLASH_CAPABILITY)
  if setting == "auto":
    form = _AUTO.get(platform, "native")
    return "native" if form == "gpu" and not cudnn_flash else form
  if setting == "tpu" and platform != "tpu":
    raise ValueError(
      f"config.kernels='tpu' (Pallas TPU kernels) needs TPU devices; these are {platform} "
      "devices: use auto, cpu or native"
    )
  if setting == "gpu" and not cudnn_flash:
    of = f" of compute capability {capability}" if capability else ""
    raise ValueError(
      "config.kernels='gpu' (cuDNN's flash attention) needs NVIDIA GPUs of compute "
      f"capability 8.0 or newer; these are {platform} devices{of}: use auto or native"
    )
  return setting


def resolve_for(setting: str, device) -> str:
  """``resolve`` for a JAX device: its platform and, on CUDA GPUs, compute capability."""
  return resolve(setting, device.platform, getattr(device, "compute_capability", None))


def check_form(form: str) -> str:
  if form not in FORMS:
    raise ValueError(
      f"kernels must be one of {', '.join(FORMS)} (resolve 'auto' with "
      f"transkd_jax.models.kernels.resolve first), got {form!r}"
    )
  return form


def _shifted_depthwise3x3(x, kernel, dilation: int = 1):
  """sum_ij x_pad[h + i d, w + j d] * kernel[i, j]: 3x3 depthwise, dilation = padding = d,
  no bias."""
  d = dilation
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
  out = None
  for i in range(3):
    for j in range(3):
      term = padded[:, i * d : i * d + height, j * d : j * d + width, :] * kernel[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise3x3_vjp(x, kernel, dilation):
  return _shifted_depthwise3x3(x, kernel, dilation)


def shifted_depthwise3x3(x, kernel, dilation: int = 1):
  """3x3 depthwise conv (NHWC, kernel 3 x 3 x C) as nine shifted multiply-adds;
  dilation = padding = ``dilation`` (LVT's atrous convs; 1 for the Mix-FFN's).

  The gradient is written out (custom VJP) rather than left to autodiff,
  which on XLA:CPU saves the nine shifted copies of ``x`` as residuals
  (9x the activation memory) and transposes them back through nine padded adds:

  * d x = the same shifted sum over the output gradient with the kernel
    flipped (a correlation's adjoint is the convolution; with padding = dilation
    the output has the input's size, so the adjoint is the same op);
  * d kernel[i, j] = sum over pixels of x_pad[h + i d, w + j d] * g[h, w],
    all nine taps in one variadic reduction, i.e. one pass over ``x`` and
    ``g`` (nine separate sums would each materialise a shifted copy on XLA:CPU).
  """
  return _shifted_depthwise3x3_vjp(x, kernel, dilation)


def _shifted_depthwise3x3_fwd(x, kernel, dilation):
  return _shifted_depthwise3x3(x, kernel, dilation), (x, kernel)


def _shifted_depthwise3x3_bwd(dilation, residuals, g):
  d = dilation
  x, kernel = residuals
  height, width = x.shape[1:3]
  dx = _shifted_depthwise3x3(g, kernel[::-1, ::-1], d)
  padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
  # Rows are summed in up to 8 chunks per image first: the outer (batch,
  # chunk) dimensions let XLA:CPU split the reduction across threads.
  chunks = max(c for c in range(1, 9) if height % c == 0)
  shape = (x.shape[0], chunks, height // chunks, width, x.shape[3])
  products = tuple(
    (padded[:, i * d : i * d + height, j * d : j * d + width, :] * g).reshape(shape)
    for i in range(3)
    for j in range(3)
  )
  zero = jnp.zeros((), g.dtype)
  sums = jax.lax.reduce(
    products, (zero,) * 9, lambda a, b: tuple(u + v for u, v in zip(a, b)), (2, 3)
  )
  dkernel = jnp.stack(sums).sum((1, 2)).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


_shifted_depthwise3x3_vjp.defvjp(_shifted_depthwise3x3_fwd, _shifted_depthwise3x3_bwd)


_CHUNK_ELEMENTS = 1 << 19  # attention logits per query chunk: 2 MiB in float32, cache-sized
_whole = False  # set by ``unchunked``


@contextlib.contextmanager
def unchunked():
  """Attention traced inside runs in one chunk: for counting FLOPs (XLA's cost
  analysis counts a loop's body once, whatever its trip count).

  JAX's trace caches are cleared on the way in and out, so a function traced
  before (or inside) is traced again with the chunking in force.
  """
  global _whole
  previous, _whole = _whole, True
  jax.clear_caches()
  try:
    yield
  finally:
    _whole = previous
    jax.clear_caches()


def _query_chunk(batch: int, tokens: int, heads: int, keys: int) -> int:
  """Queries per chunk: batch x chunk x heads x keys logits stay near ``_CHUNK_ELEMENTS``.

  The tokens are split evenly over as few chunks as that allows, so fewer query rows
  than there are chunks are padding.
  """
  if _whole:
    return tokens
  most = max(1, min(tokens, _CHUNK_ELEMENTS // (batch * heads * keys)))
  chunks = -(-tokens // most)
  return -(-tokens // chunks)


def _chunked(x, chunk: int):
  """(b, t, ...) -> (t / chunk, b, chunk, ...), zero-padding t to a multiple of chunk."""
  b, t = x.shape[:2]
  count = -(-t // chunk)
  if count * chunk != t:
    x = jnp.pad(x, [(0, 0), (0, count * chunk - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape(b, count, chunk, *x.shape[2:]), 0, 1)


def _unchunked(x, tokens: int):
  count, b, chunk = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(b, count * chunk, *x.shape[3:])[:, :tokens]


def _probabilities(q, k):
  """softmax over keys of q k^T for a chunk of (already scaled) queries: (b, n, c, s)."""
  logits = jnp.einsum("bcnh,bsnh->bncs", q, k)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return e * (1 / jnp.sum(e, axis=-1, keepdims=True))


def _softmax_attention_fwd(q, k, v):
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)
  chunk = _query_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[1])
  # Heads-major inside a chunk ((b, n, tokens, h): plain batched matmuls): XLA:CPU
  # otherwise transposes each chunk's probabilities before multiplying them by V.
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

  def one_chunk(qc):
    qh = jnp.swapaxes(qc, 1, 2) * scale
    logits = jnp.einsum("bnch,bnsh->bncs", qh, kh)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = e * (1 / jnp.sum(e, axis=-1, keepdims=True))
    return jnp.swapaxes(jnp.einsum("bncs,bnsh->bnch", probs, vh), 1, 2)

  if chunk >= q.shape[1]:  # one chunk: no loop
    out = one_chunk(q)
  else:
    out = _unchunked(jax.lax.map(one_chunk, _chunked(q, chunk)), q.shape[1])
  return out, (q, k, v, out)


@jax.custom_vjp
def softmax_attention(q, k, v):
  """softmax(q k^T / sqrt(head_dim)) v for (batch, tokens, heads, head_dim) inputs.

  The same function as ``jax.nn.dot_product_attention(q, k, v)``, computed a
  chunk of queries at a time (``lax.map``), so each chunk's logits stay in
  cache: on XLA:CPU the whole (tokens x keys) matrix of MiT's first stage
  (32768 x 512 per image at 512 x 1024) costs more in memory traffic than in
  arithmetic. The backward pass is written out the same way, recomputing each
  chunk's probabilities P instead of storing them: with O the output, dV = sum
  P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(d), dK = sum dS^T
  Q / sqrt(d). Autodiff through ``jax.nn.dot_product_attention`` instead fuses
  the softmax backward into one slow fusion on XLA:CPU (docs/performance.md).
  """
  return _softmax_attention_fwd(q, k, v)[0]


def _softmax_attention_bwd(residuals, g):
  q, k, v, out = residuals
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)
  chunk = _query_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[1])

  def one_chunk(carry, chunk_of):
    dk, dv = carry
    qc, gc, oc = chunk_of  # padded query rows have gc = 0: they add nothing
    qc = qc * scale
    probs = _probabilities(qc, k)
    dv = dv + jnp.einsum("bncs,bcnh->bsnh", probs, gc)
    dprobs = jnp.einsum("bcnh,bsnh->bncs", gc, v)
    rowdot = jnp.einsum("bcnh,bcnh->bnc", gc, oc)[..., None]
    dlogits = probs * (dprobs - rowdot)
    dq = jnp.einsum("bncs,bsnh->bcnh", dlogits, k) * scale
    dk = dk + jnp.einsum("bncs,bcnh->bsnh", dlogits, qc)
    return (dk, dv), dq

  zeros = (jnp.zeros_like(k), jnp.zeros_like(v))
  if chunk >= q.shape[1]:  # one chunk: no loop
    (dk, dv), dq = one_chunk(zeros, (q, g, out))
    return dq, dk, dv
  (dk, dv), dq = jax.lax.scan(one_chunk, zeros, tuple(_chunked(x, chunk) for x in (q, g, out)))
  return _unchunked(dq, q.shape[1]), dk, dv


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def depthwise3x3(x, kernel, form: str, dilation: int = 1):
  """3x3 depthwise convolution, stride 1, no bias, dilation = padding = ``dilation`` (the
  output keeps the input's size); ``kernel`` is 3 x 3 x 1 x C."""
  if check_form(form) == "cpu":
    return shifted_depthwise3x3(x, kernel[:, :, 0, :], dilation)
  d = dilation
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((d, d), (d, d)),
    rhs_dilation=(d, d),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


_SPLASH_BLOCKS = (512, 256, 128)  # the splash kernel's block along a sequence, largest first


def _splash_block(length: int):
  """The largest of ``_SPLASH_BLOCKS`` that tiles ``length``; None when none does."""
  return next((b for b in _SPLASH_BLOCKS if length % b == 0), None)


def splash_fits(tokens: int, keys: int) -> bool:
  """Whether ``splash_attention`` takes these sequence lengths (else the native form runs):
  both in blocks of 128 or more (TPU's lane width). MiT at 512 x 1024 has 512 keys and
  32,768 / 8,192 / 2,048 / 512 queries in its four stages."""
  return _splash_block(tokens) is not None and _splash_block(keys) is not None


@functools.lru_cache(maxsize=None)
def _splash_kernel(tokens: int, keys: int, heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  bq, bk = _splash_block(tokens), _splash_block(keys)
  blocks = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    use_fused_bwd_kernel=True,
    # The kernel reads q, k and v with the tokens in the 128 lanes: MiT's heads are 32
    # or 64 wide, and with the head in the lanes XLA:TPU stores and reads q, k, v and dq
    # padded to 128 (one stage-1 attention of B0 at 8 images of 512x1024 per chip,
    # forward and backward: 619 -> 446 MiB of HBM traffic).
    q_layout=splash.QKVLayout.SEQ_MINOR,
    k_layout=splash.QKVLayout.SEQ_MINOR,
    v_layout=splash.QKVLayout.SEQ_MINOR,
  )
  mask = masks.MultiHeadMask([masks.FullMask((tokens, keys))] * heads)
  return splash.make_splash_mha(
    mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def splash_attention(q, k, v, interpret: bool = False):
  """``jax.nn.dot_product_attention(q, k, v)`` by JAX's Pallas TPU splash-attention kernel,
  for (batch, tokens, heads, head_dim) inputs whose lengths ``splash_fits``.

  The kernel walks blocks of queries against blocks of keys with an online softmax, so
  the (tokens x keys) scores and probabilities live only in the TPU's VMEM; its backward
  (one fused kernel for dq, dk and dv) recomputes them from the saved log-sum-exp per
  query. The scores it keeps out of HBM are MiT's largest tensors: 32,768 x 512 per head
  and image in stage 1 at 512 x 1024, written and read several times per step by the
  native form. To XLA each kernel is a custom call whose bytes are the kernel's own
  estimate, its operands and results read and written once; it declares no FLOPs, so
  XLA's FLOP count leaves the attention's matmuls out.

  XLA cannot partition a Pallas kernel over several devices: inside a program traced on a
  mesh (``sharding.traced_on``: the train and eval steps) the kernel runs per device
  under ``shard_map``, on that device's images (the batch split over every mesh axis, as
  the steps' batches are).

  Runs on TPUs; elsewhere only with ``interpret=True`` (Pallas' interpreter: the tests).
  """
  kernel = _splash_kernel(q.shape[1], k.shape[1], q.shape[2], interpret)

  def heads_major(t):  # the kernel's layout, per image: (heads, tokens, head_dim)
    return jnp.swapaxes(t, 1, 2)

  def per_device(q, k, v):
    # The kernel takes the scale in its inputs. On the keys, not the queries: q . (k * s)
    # is (q * s) . k, and MiT's keys are the spatially reduced ones (512 at 512 x 1024
    # against 32,768 queries in stage 1), so the product and its gradient are small.
    scale = np.asarray(q.shape[-1] ** -0.5, k.dtype)
    return heads_major(jax.vmap(kernel)(heads_major(q), heads_major(k * scale), heads_major(v)))

  if _devices_in_context() == 1:
    return per_device(q, k, v)
  mesh = jax.sharding.get_abstract_mesh()
  batch = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(per_device, mesh=mesh, in_specs=batch, out_specs=batch, check_vma=False)(
    q, k, v
  )


def _devices_in_context() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.size


def cudnn_fits(q, k, v) -> bool:
  """Whether cuDNN's flash attention takes these inputs (else XLA's runs): bfloat16 or
  float16, all three alike, heads a multiple of 8 and at most 128 wide (MiT's are 32 and 64;
  Hopper takes up to 256, Ampere 128)."""
  head_dim = q.shape[-1]
  return (
    q.dtype in (jnp.bfloat16, jnp.float16)
    and q.dtype == k.dtype == v.dtype
    and head_dim % 8 == 0
    and head_dim <= 128
  )


def attention(q, k, v, form: str):
  """Scaled dot-product attention over (batch, tokens, heads, head_dim) inputs."""
  if check_form(form) == "cpu":
    return softmax_attention(q, k, v)
  if form == "gpu" and cudnn_fits(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if (
    form == "tpu"
    and splash_fits(q.shape[1], k.shape[1])
    and q.shape[0] % _devices_in_context() == 0  # whole images per device
  ):
    return splash_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v)


# --------------------------------------------------------------------------
# Resizing as PyTorch's F.interpolate (transkd_jax/models/resize.py resizes with these)
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bilinear_taps(in_size: int, out_size: int):
  """PyTorch bilinear, align_corners=False: (lo, hi, frac) per output index.

  src = (dst + 0.5) * in / out - 0.5, clamped at 0; out = x[lo] * (1 - frac) + x[hi] * frac.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The same interpolation as an (out_size, in_size) matrix (for tests and reading)."""
  lo, hi, frac = bilinear_taps(in_size, out_size)
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=None)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index under PyTorch's "nearest" rule."""
  scale = in_size / out_size
  src = np.floor(np.arange(out_size, dtype=np.float64) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def nearest_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch "nearest" as an (out_size, in_size) 0/1 matrix."""
  weights = np.zeros((out_size, in_size), np.float32)
  weights[np.arange(out_size), nearest_indices(in_size, out_size)] = 1.0
  return weights


@functools.lru_cache(maxsize=None)
def adjoint_taps(mode: str, in_size: int, out_size: int):
  """The transposed interpolation as gathers: (index, weight), each (in_size, taps).

  Source row k of the gradient is sum_t g[index[k, t]] * weight[k, t]; rows
  with fewer contributors are padded with weight 0. The weights are exactly
  the forward ones (bilinear: 1 - frac and frac), so the gradient equals
  the transpose of ``bilinear_matrix``.
  """
  if mode == "bilinear":
    lo, hi, frac = bilinear_taps(in_size, out_size)
    pairs = [(lo, 1.0 - frac), (hi, frac)]
  else:
    pairs = [(nearest_indices(in_size, out_size), np.ones(out_size, np.float32))]
  contrib = [[] for _ in range(in_size)]  # per source row: [(output row, weight)]
  for src, weight in pairs:
    for o in range(out_size):
      contrib[src[o]].append((o, weight[o]))
  taps = max(1, max(len(c) for c in contrib))
  index = np.zeros((in_size, taps), np.int32)
  weight = np.zeros((in_size, taps), np.float32)
  for k, c in enumerate(contrib):
    for t, (o, w) in enumerate(c):
      index[k, t], weight[k, t] = o, w
  return index, weight


def _bcast(v, x, axis):
  return jnp.asarray(v, x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))


def _interp_axis_fwd_impl(x, axis: int, out_size: int, mode: str):
  if mode == "nearest":
    return jnp.take(x, nearest_indices(x.shape[axis], out_size), axis=axis)
  lo, hi, frac = bilinear_taps(x.shape[axis], out_size)
  frac = _bcast(frac, x, axis)
  return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _interp_axis(x, axis: int, in_size: int, out_size: int, mode: str):
  return _interp_axis_fwd_impl(x, axis, out_size, mode)


def _interp_axis_fwd(x, axis, in_size, out_size, mode):
  return _interp_axis_fwd_impl(x, axis, out_size, mode), None


def _interp_axis_bwd(axis, in_size, out_size, mode, _, g):
  index, weight = adjoint_taps(mode, in_size, out_size)
  out = None
  for t in range(index.shape[1]):
    term = jnp.take(g, index[:, t], axis=axis)
    if mode == "bilinear" or not np.all(weight[:, t] == 1.0):
      term = term * _bcast(weight[:, t], g, axis)
    out = term if out is None else out + term
  return (out,)


_interp_axis.defvjp(_interp_axis_fwd, _interp_axis_bwd)


def _native_axis(x, axis: int, out_size: int, mode: str):
  in_size = x.shape[axis]
  if mode == "nearest" and out_size % in_size == 0:
    return jnp.repeat(x, out_size // in_size, axis=axis)  # floor(i * in / out) = i // factor
  matrix = (bilinear_matrix if mode == "bilinear" else nearest_matrix)(in_size, out_size)
  return contract_axis(matrix, x, axis)


def contract_axis(matrix, x, axis: int):
  """``x`` with its ``axis`` (of size ``matrix.shape[1]``) contracted with an (out, in)
  interpolation ``matrix``, at full float32 precision: the native form's resize."""
  y = jnp.tensordot(
    jnp.asarray(matrix, x.dtype), x, axes=(1, axis), precision=jax.lax.Precision.HIGHEST
  )
  return jnp.moveaxis(y, 0, axis)


def interpolate_axis(x, axis: int, out_size: int, mode: str, form: str):
  """Interpolates ``x`` along ``axis`` to ``out_size`` by PyTorch's rule ``mode`` (bilinear,
  align_corners=False, or nearest): row gathers with a gather VJP (cpu), or a contraction
  with the interpolation matrix (native). Integer arrays (labels) are gathered in both."""
  check_form(form)
  if not jnp.issubdtype(x.dtype, jnp.inexact):  # integer maps (labels): a plain gather
    return _interp_axis_fwd_impl(x, axis, out_size, mode)
  if form == "cpu":
    return _interp_axis(x, axis, x.shape[axis], out_size, mode)
  return _native_axis(x, axis, out_size, mode)


def linear(x, kernel, precision=None):
  """``x[..., C] @ kernel[C, D]`` over a 2-D (tokens x C) view of ``x``.

  The result equals ``jnp.dot(x, kernel)``. The difference is in the weight
  gradient: autodiff of the N-d form contracts over every leading axis, and
  XLA:CPU then copies the output gradient into a transposed layout and runs
  an Eigen matmul with both operands transposed (3-6x slower than the 2-D
  one at MiT stage-1 sizes). Over the 2-D view the weight gradient is a
  plain ``x^T @ g``: the TransKD-Base train step is 4-11 % faster on XLA:CPU
  (docs/performance.md). The reshape merges leading axes only, so a batch
  sharding carries over.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel, precision=precision)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """``nn.Dense``'s ``dot_general`` as ``linear``: pass it as ``nn.Dense(dot_general=...)``."""
  (x_axes, kernel_axes), batch_axes = dimension_numbers
  if (
    tuple(x_axes) != (x.ndim - 1,)
    or tuple(kernel_axes) != (0,)
    or kernel.ndim != 2
    or any(batch_axes)
    or preferred_element_type is not None
  ):
    raise ValueError(
      "dense_dot_general contracts the input's last axis with a 2-D kernel's "
      f"first (nn.Dense over one axis), got dimension_numbers="
      f"{dimension_numbers!r} for shapes {x.shape} and {kernel.shape}"
    )
  return linear(x, kernel, precision)


# --------------------------------------------------------------------------
# The image's patch embedding: a strided conv over few channels
# --------------------------------------------------------------------------

_IMAGE_CHANNELS = 8  # inputs with fewer channels than this are images (RGB: 3)


def patch_conv(form: str):
  """The ``conv_general_dilated`` of a strided patch-embedding conv for ``form``: pass it
  as ``nn.Conv(conv_general_dilated=...)``. ``tpu``: ``space_to_depth_conv``; every other
  form: ``jax.lax.conv_general_dilated``."""
  return space_to_depth_conv if check_form(form) == "tpu" else jax.lax.conv_general_dilated


def _column_blocks(width: int, s: int, dtype):
  """The width x width identity as [w, j, v], w = s v + j: contracting an image's columns
  with it changes no value, and gives the columns as (block v, offset j)."""
  identity = np.eye(width, dtype=np.float32).reshape(width, width // s, s)
  return jnp.asarray(identity.transpose(0, 2, 1), dtype)


def space_to_depth_conv(
  x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs
):
  """``jax.lax.conv_general_dilated`` (NHWC, HWIO, as ``nn.Conv`` calls it), computed as a
  stride-1 conv over the input's stride x stride blocks where the input is an image.

  MiT's first patch embedding is a 7x7 conv, stride 4, over the 3 channels of the image.
  XLA:TPU lays such an input out with the batch in the 128-wide lane dimension and the
  channels padded: at 8 images of 512x1024 per chip it stores and reads 512 MiB where the
  image holds 24 MiB, three times per step (the student's and the teacher's forward, the
  student's kernel gradient). Folded into blocks (``s x s x C`` = 48 channels) the input
  has channels enough to fill the lanes, and the conv becomes a 2x2 one, stride 1, with
  the kernel zero-padded to whole blocks: the same sums over the same products, added
  in another order. The fold moves each column w to block w // s, offset w % s: a
  shuffle within the 128 lanes, where XLA:TPU keeps the image's width. As a reshape and
  transpose alone it went through a batch-minor copy (2 x 384 MiB per step at 8 images
  per chip). The columns are first contracted with the identity matrix (same values,
  exactly: each output is one input times 1, at full precision); XLA:TPU runs that on the
  matmul unit and lays its result out for the fold, which then moves 24 MiB (26 GFLOP per
  step). Any other conv (more channels, dilation, groups, sizes that do not
  split into blocks) is ``jax.lax.conv_general_dilated`` itself.
  """
  batch, height, width, channels = x.shape
  size, _, _, features = kernel.shape
  s = strides[0]
  plain = (
    kwargs.get("feature_group_count", 1) != 1
    or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    or tuple(strides) != (s, s)
    or s == 1
    or channels >= _IMAGE_CHANNELS
    or kernel.shape[1] != size
    or height % s
    or width % s
    or isinstance(padding, str)
    or len({tuple(p) for p in padding}) != 1
    or kwargs.get("dimension_numbers")
    != jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  )
  if not plain:
    low, high = padding[0]
    blocks = -(-low // s)  # the low padding, in whole blocks
    front = blocks * s - low  # zeros before the kernel's first tap
    padded = s * -(-(size + front) // s)  # the kernel, in whole blocks
    # Blocks of padding after the input, per axis, so the outputs are as many as the conv's.
    back = [(n + low + high - size) // s + padded // s - blocks - n // s for n in (height, width)]
    plain = min(back) < 0
  if plain:
    return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation, rhs_dilation, **kwargs
    )
  # The identity on the columns: the lane shuffle of the fold runs on the matmul unit.
  x = jnp.einsum(
    "nhwc,wjv->nhvjc", x, _column_blocks(width, s, x.dtype), precision=jax.lax.Precision.HIGHEST
  )
  x = x.reshape(batch, height // s, s, width // s, s, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // s, width // s, s * s * channels)
  taps = ((front, padded - size - front),) * 2 + ((0, 0), (0, 0))
  kernel = jnp.pad(kernel, taps).reshape(padded // s, s, padded // s, s, channels, features)
  kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(padded // s, padded // s, -1, features)
  pads = [(blocks, b) for b in back]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, **kwargs)


def patch_matmul(x, kernel, form: str):
  """A conv whose kernel (HWIO, r x r) equals its stride, no padding, over NHWC ``x``: the
  spatial reduction of MiT's attention. Trailing rows and columns that fill no patch are
  dropped, as PyTorch does.

  ``cpu`` and ``native``: a reshape into the patches and one matmul, fast forwards and
  backwards on XLA:CPU. ``tpu``: the strided conv itself. XLA:TPU made the patches of the
  reshape form in a transposed copy, forwards and backwards: for one spatial reduction of
  8 x 8 over 8 stage-1 maps of 128 x 256 x 32 it moved 162 MiB per step where the conv
  moves 34 MiB (train step, v5e, from the compiled program's shapes).
  """
  r = kernel.shape[0]
  if check_form(form) == "tpu":
    return jax.lax.conv_general_dilated(
      x, kernel, (r, r), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  batch, height, width, channels = x.shape
  h, w = height // r, width // r
  x = x[:, : h * r, : w * r].reshape(batch, h, r, w, r, channels)
  return jnp.einsum("bhiwjc,ijcd->bhwd", x, kernel)
