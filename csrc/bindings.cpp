// The one binding file of zigspark._C. It includes no torch header: Python passes raw device pointers
// (tensor.data_ptr()), sizes, strides, a dtype code, the device index and the stream handle, after it
// has validated and allocated everything. Errors come back as RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <set>
#include <string>

#include "common/dtype.h"
#include "attention/attention.h"
#include "causal_conv1d/causal_conv1d.h"
#include "selective_scan/selective_scan.h"
#include "spark_ffn/spark_ffn.h"
#include "stat_topk/stat_topk.h"
#include "token_prune/token_prune.h"

#ifndef ZIGSPARK_ARCHS
#define ZIGSPARK_ARCHS ""
#endif
// The emulate test tier builds this file a second time, against csrc/emulate, as zigspark._C_emulated.
#ifndef ZIGSPARK_MODULE_NAME
#define ZIGSPARK_MODULE_NAME _C
#endif

namespace py = pybind11;
using namespace zigspark;

namespace {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

OrderArgs make_order(int kind, int64_t frames, int64_t h, int64_t w, int path, int reverse, uintptr_t index,
                     int64_t length) {
  OrderArgs o;
  o.kind = kind;
  o.frames = frames;
  o.h = h;
  o.w = w;
  o.path = path;
  o.reverse = reverse;
  o.index = reinterpret_cast<const int64_t*>(index);
  o.length = length;
  return o;
}

// Keyword arguments -> SelectiveScanParams. Every pointer is optional (0).
SelectiveScanParams scan_params(const py::kwargs& kw) {
  static const std::set<std::string> known = {
      "batch", "dim", "length", "dstate", "groups", "chunks", "u", "delta", "A", "B", "C", "D", "z", "delta_bias",
      "out", "last_state", "checkpoints", "dout", "dlast", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "b_mode",
      "c_mode", "delta_softplus", "dtype", "order_kind", "order_frames", "order_h", "order_w", "order_path",
      "order_reverse", "order_index", "device", "stream"};
  for (auto item : kw) {  // a misspelt pointer would otherwise silently become 0
    const std::string key = py::str(item.first);
    if (!known.count(key)) throw py::type_error("zigspark._C selective_scan: unknown argument '" + key + "'");
  }
  auto ptr = [&](const char* name) { return kw.contains(name) ? kw[name].cast<uintptr_t>() : uintptr_t(0); };
  auto num = [&](const char* name) { return kw[name].cast<int64_t>(); };
  SelectiveScanParams p;
  p.shape.batch = num("batch");
  p.shape.dim = num("dim");
  p.shape.length = num("length");
  p.shape.dstate = int(num("dstate"));
  p.shape.groups = num("groups");
  p.shape.chunks = num("chunks");
  p.u = ptr("u"); p.delta = ptr("delta"); p.A = ptr("A"); p.B = ptr("B"); p.C = ptr("C"); p.D = ptr("D");
  p.z = ptr("z"); p.delta_bias = ptr("delta_bias"); p.out = ptr("out"); p.last_state = ptr("last_state");
  p.checkpoints = ptr("checkpoints"); p.dout = ptr("dout"); p.dlast = ptr("dlast"); p.du = ptr("du");
  p.ddelta = ptr("ddelta"); p.dA = ptr("dA"); p.dB = ptr("dB"); p.dC = ptr("dC"); p.dD = ptr("dD"); p.dz = ptr("dz");
  p.b_mode = int(num("b_mode"));
  p.c_mode = int(num("c_mode"));
  p.delta_softplus = kw["delta_softplus"].cast<bool>();
  p.dtype = int(num("dtype"));
  p.order = make_order(int(num("order_kind")), num("order_frames"), num("order_h"), num("order_w"),
                       int(num("order_path")), int(num("order_reverse")), ptr("order_index"), p.shape.length);
  p.device = int(num("device"));
  p.stream = ptr("stream");
  return p;
}

}  // namespace

PYBIND11_MODULE(ZIGSPARK_MODULE_NAME, m) {
  m.doc() = "zigspark CUDA kernels (torch-independent; see zigspark.cuda_ops for the Python side)";
  m.def("compiled_archs", [] { return std::string(ZIGSPARK_ARCHS); },
        "';'-separated architectures compiled into this module (sm_XX = machine code, compute_XX = PTX)");
  m.def("device_count", &device_count, "CUDA devices visible to zigspark's (static) CUDA runtime");
  m.def("cuda_runtime_version", &runtime_version, "CUDA runtime version linked into _C, e.g. 13000");
  m.def("cuda_driver_version", &driver_version, "CUDA driver version, 0 when no driver is loaded");

  m.def(
      "stat_topk_forward",
      [](uintptr_t x, uintptr_t y, uintptr_t mask, uintptr_t mean, uintptr_t std, int64_t rows, int64_t d,
         int64_t x_row_stride, int64_t y_row_stride, int64_t mask_row_stride, int dtype, double z, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        stat_topk_forward({x, y, mask, mean, std, rows, d, x_row_stride, y_row_stride, mask_row_stride, dtype, z,
                           device, stream});
      },
      py::arg("x"), py::arg("y"), py::arg("mask"), py::arg("mean"), py::arg("std"), py::arg("rows"), py::arg("d"),
      py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("mask_row_stride"), py::arg("dtype"), py::arg("z"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "stat_topk_backward",
      [](uintptr_t grad_y, uintptr_t x, uintptr_t mean, uintptr_t std, uintptr_t grad_x, int64_t rows, int64_t d,
         int64_t grad_y_row_stride, int64_t x_row_stride, int64_t grad_x_row_stride, int dtype, double z, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        stat_topk_backward({grad_y, x, mean, std, grad_x, rows, d, grad_y_row_stride, x_row_stride,
                            grad_x_row_stride, dtype, z, device, stream});
      },
      py::arg("grad_y"), py::arg("x"), py::arg("mean"), py::arg("std"), py::arg("grad_x"), py::arg("rows"),
      py::arg("d"), py::arg("grad_y_row_stride"), py::arg("x_row_stride"), py::arg("grad_x_row_stride"),
      py::arg("dtype"), py::arg("z"), py::arg("device"), py::arg("stream"));

  m.def("selective_scan_chunk", &selective_scan_chunk, "steps per chunk of the selective scan kernels");
  m.def(
      "selective_scan_forward",
      [](py::kwargs kw) {
        const SelectiveScanParams p = scan_params(kw);
        py::gil_scoped_release release;
        selective_scan_forward(p);
      },
      "selective scan forward; keyword arguments as the fields of SelectiveScanParams (selective_scan.h)");
  m.def(
      "selective_scan_backward",
      [](py::kwargs kw) {
        const SelectiveScanParams p = scan_params(kw);
        py::gil_scoped_release release;
        selective_scan_backward(p);
      },
      "selective scan backward; keyword arguments as the fields of SelectiveScanParams (selective_scan.h)");

  m.def(
      "causal_conv1d_forward",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, int64_t batch, int64_t dim, int64_t length,
         int width, int dtype, bool silu, int order_kind, int64_t order_frames, int64_t order_h, int64_t order_w,
         int order_path, int order_reverse, uintptr_t order_index, int device, uintptr_t stream) {
        CausalConv1dForwardArgs a;
        a.x = x; a.weight = weight; a.bias = bias; a.out = out;
        a.batch = batch; a.dim = dim; a.length = length; a.width = width; a.dtype = dtype; a.silu = silu;
        a.order = make_order(order_kind, order_frames, order_h, order_w, order_path, order_reverse, order_index,
                             length);
        a.device = device; a.stream = stream;
        py::gil_scoped_release release;
        causal_conv1d_forward(a);
      },
      "depthwise causal conv1d along an order, forward (causal_conv1d.h); weight/bias float32, bias 0 if absent",
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("batch"), py::arg("dim"),
      py::arg("length"), py::arg("width"), py::arg("dtype"), py::arg("silu"), py::arg("order_kind"),
      py::arg("order_frames"), py::arg("order_h"), py::arg("order_w"), py::arg("order_path"),
      py::arg("order_reverse"), py::arg("order_index"), py::arg("device"), py::arg("stream"));

  m.def(
      "causal_conv1d_backward",
      [](uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t dx, uintptr_t dweight,
         uintptr_t dbias, int64_t batch, int64_t dim, int64_t length, int width, int dtype, bool silu,
         int order_kind, int64_t order_frames, int64_t order_h, int64_t order_w, int order_path, int order_reverse,
         uintptr_t order_index, int device, uintptr_t stream) {
        CausalConv1dBackwardArgs a;
        a.dout = dout; a.x = x; a.weight = weight; a.bias = bias;
        a.dx = dx; a.dweight = dweight; a.dbias = dbias;
        a.batch = batch; a.dim = dim; a.length = length; a.width = width; a.dtype = dtype; a.silu = silu;
        a.order = make_order(order_kind, order_frames, order_h, order_w, order_path, order_reverse, order_index,
                             length);
        a.device = device; a.stream = stream;
        py::gil_scoped_release release;
        causal_conv1d_backward(a);
      },
      "depthwise causal conv1d backward; dweight (dim, width) and dbias (dim,) float32, zero-filled, accumulated",
      py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("dx"), py::arg("dweight"),
      py::arg("dbias"), py::arg("batch"), py::arg("dim"), py::arg("length"), py::arg("width"), py::arg("dtype"),
      py::arg("silu"), py::arg("order_kind"), py::arg("order_frames"), py::arg("order_h"), py::arg("order_w"),
      py::arg("order_path"), py::arg("order_reverse"), py::arg("order_index"), py::arg("device"),
      py::arg("stream"));

  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int64_t batch, int64_t seqlen_q,
         int64_t seqlen_k, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride_b, int64_t q_stride_s,
         int64_t q_stride_h, int64_t k_stride_b, int64_t k_stride_s, int64_t k_stride_h, int64_t v_stride_b,
         int64_t v_stride_s, int64_t v_stride_h, int64_t out_stride_b, int64_t out_stride_s, int64_t out_stride_h,
         double scale, bool causal, int dtype, int device, uintptr_t stream) {
        AttentionForwardArgs a;
        a.q = q; a.k = k; a.v = v; a.out = out; a.lse = lse;
        a.batch = batch; a.seqlen_q = seqlen_q; a.seqlen_k = seqlen_k; a.heads = heads; a.kv_heads = kv_heads;
        a.head_dim = head_dim;
        a.q_stride_b = q_stride_b; a.q_stride_s = q_stride_s; a.q_stride_h = q_stride_h;
        a.k_stride_b = k_stride_b; a.k_stride_s = k_stride_s; a.k_stride_h = k_stride_h;
        a.v_stride_b = v_stride_b; a.v_stride_s = v_stride_s; a.v_stride_h = v_stride_h;
        a.out_stride_b = out_stride_b; a.out_stride_s = out_stride_s; a.out_stride_h = out_stride_h;
        a.scale = float(scale); a.causal = causal; a.dtype = dtype; a.device = device; a.stream = stream;
        py::gil_scoped_release release;
        attention_forward(a);
      },
      "flash attention forward (attention.h): out like q, lse (batch, heads, seqlen_q) float32; v = out = 0: lse only",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("batch"),
      py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
      py::arg("q_stride_b"), py::arg("q_stride_s"), py::arg("q_stride_h"), py::arg("k_stride_b"),
      py::arg("k_stride_s"), py::arg("k_stride_h"), py::arg("v_stride_b"), py::arg("v_stride_s"),
      py::arg("v_stride_h"), py::arg("out_stride_b"), py::arg("out_stride_s"), py::arg("out_stride_h"),
      py::arg("scale"), py::arg("causal"), py::arg("dtype"), py::arg("device"), py::arg("stream"));

  m.def("hiprune_select_workspace", &hiprune_select_workspace_bytes,
        "bytes of global workspace hiprune_select needs (0: every sample fits in shared memory); "
        "force_workspace=True sizes the global-memory path even where shared memory would do",
        py::arg("batch"), py::arg("n"), py::arg("n_anchor"), py::arg("device"), py::arg("force_workspace") = false);
  m.def(
      "hiprune_select",
      [](uintptr_t obj, uintptr_t deep, uintptr_t always, uintptr_t out, uintptr_t workspace,
         int64_t workspace_bytes, int64_t batch, int64_t n, int64_t h, int64_t w, int64_t keep, int64_t n_anchor,
         int64_t n_always, int64_t always_sample_stride, bool wrap_rows, int dtype, int device, uintptr_t stream) {
        HipruneSelectArgs a;
        a.obj = obj; a.deep = deep; a.always = always; a.out = out; a.workspace = workspace;
        a.workspace_bytes = workspace_bytes;
        a.batch = batch; a.n = n; a.h = h; a.w = w; a.keep = keep; a.n_anchor = n_anchor; a.n_always = n_always;
        a.always_sample_stride = always_sample_stride;
        a.wrap_rows = wrap_rows; a.dtype = dtype; a.device = device; a.stream = stream;
        py::gil_scoped_release release;
        hiprune_select(a);
      },
      "HiPrune token selection (token_prune.h): out (batch, keep) int64 ascending; scores float32/16/bf16",
      py::arg("obj"), py::arg("deep"), py::arg("always"), py::arg("out"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("batch"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("keep"),
      py::arg("n_anchor"), py::arg("n_always"), py::arg("always_sample_stride"), py::arg("wrap_rows"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"));

  auto prune_args = [](uintptr_t src, uintptr_t index, uintptr_t dst, int64_t batch, int64_t tokens, int64_t keep,
                       int64_t channels, int64_t src_batch_stride, int64_t src_row_stride, int64_t dst_batch_stride,
                       int64_t dst_row_stride, bool unique_index, int dtype, int device, uintptr_t stream) {
    PruneTokensArgs a;
    a.src = src; a.index = index; a.dst = dst;
    a.batch = batch; a.tokens = tokens; a.keep = keep; a.channels = channels;
    a.src_batch_stride = src_batch_stride; a.src_row_stride = src_row_stride;
    a.dst_batch_stride = dst_batch_stride; a.dst_row_stride = dst_row_stride;
    a.unique_index = unique_index; a.dtype = dtype; a.device = device; a.stream = stream;
    return a;
  };
  m.def(
      "prune_tokens_forward",
      [prune_args](uintptr_t x, uintptr_t index, uintptr_t out, int64_t batch, int64_t tokens, int64_t keep,
                   int64_t channels, int64_t x_batch_stride, int64_t x_row_stride, int64_t out_batch_stride,
                   int64_t out_row_stride, int dtype, int device, uintptr_t stream) {
        const PruneTokensArgs a = prune_args(x, index, out, batch, tokens, keep, channels, x_batch_stride,
                                             x_row_stride, out_batch_stride, out_row_stride, true, dtype, device,
                                             stream);
        py::gil_scoped_release release;
        prune_tokens_forward(a);
      },
      "out[b, j] = x[b, index[b, j]] (token_prune.h); rows with a contiguous last dimension, strides in elements",
      py::arg("x"), py::arg("index"), py::arg("out"), py::arg("batch"), py::arg("tokens"), py::arg("keep"),
      py::arg("channels"), py::arg("x_batch_stride"), py::arg("x_row_stride"), py::arg("out_batch_stride"),
      py::arg("out_row_stride"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def(
      "prune_tokens_backward",
      [prune_args](uintptr_t grad_out, uintptr_t index, uintptr_t grad_x, int64_t batch, int64_t tokens,
                   int64_t keep, int64_t channels, int64_t grad_out_batch_stride, int64_t grad_out_row_stride,
                   int64_t grad_x_batch_stride, int64_t grad_x_row_stride, bool unique_index, int dtype, int device,
                   uintptr_t stream) {
        const PruneTokensArgs a = prune_args(grad_out, index, grad_x, batch, tokens, keep, channels,
                                             grad_out_batch_stride, grad_out_row_stride, grad_x_batch_stride,
                                             grad_x_row_stride, unique_index, dtype, device, stream);
        py::gil_scoped_release release;
        prune_tokens_backward(a);
      },
      "grad_x[b, index[b, j]] (+)= grad_out[b, j] into a zero-filled grad_x (token_prune.h): plain stores when "
      "unique_index, atomics otherwise",
      py::arg("grad_out"), py::arg("index"), py::arg("grad_x"), py::arg("batch"), py::arg("tokens"),
      py::arg("keep"), py::arg("channels"), py::arg("grad_out_batch_stride"), py::arg("grad_out_row_stride"),
      py::arg("grad_x_batch_stride"), py::arg("grad_x_row_stride"), py::arg("unique_index"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"));

  m.def("spark_ffn_slices", &spark_ffn_slices,
        "neuron slices per token the Spark FFN forward runs with on a GPU of `multiprocessors` SMs (spark_ffn.h); "
        "for slices > 1 it needs a float32 (tokens, slices, d_model) workspace",
        py::arg("tokens"), py::arg("d_ff"), py::arg("multiprocessors"));
  m.def(
      "spark_ffn_forward",
      [](uintptr_t x, uintptr_t gate, uintptr_t k2, uintptr_t vt, uintptr_t out, uintptr_t partial, int64_t tokens,
         int64_t d_model, int64_t d_ff, int64_t r, int64_t x_row_stride, int64_t gate_row_stride,
         int64_t k2_row_stride, int64_t vt_row_stride, int64_t out_row_stride, int64_t slices, int dtype, int device,
         uintptr_t stream, uintptr_t k1, uintptr_t moments, int64_t k1_row_stride, double z) {
        SparkFfnForwardArgs a;
        a.k1 = k1; a.moments = moments; a.k1_row_stride = k1_row_stride; a.z = z;
        a.x = x; a.gate = gate; a.k2 = k2; a.vt = vt; a.out = out; a.partial = partial;
        a.tokens = tokens; a.d_model = d_model; a.d_ff = d_ff; a.r = r;
        a.x_row_stride = x_row_stride; a.gate_row_stride = gate_row_stride; a.k2_row_stride = k2_row_stride;
        a.vt_row_stride = vt_row_stride; a.out_row_stride = out_row_stride;
        a.slices = slices; a.dtype = dtype; a.device = device; a.stream = stream;
        py::gil_scoped_release release;
        spark_ffn_forward(a);
      },
      "Spark FFN sparse inference (spark_ffn.h): out_t = Σ_{g_ti > 0} GELU(g_ti)·(K2_i·x_t[r:])·Vᵀ_i, "
      "reading only the active rows of K2 and Vᵀ; float32/16/bf16, float32 accumulation; partial = 0 when "
      "slices == 1; with k1 != 0 it computes the predictor and the threshold itself (gate and moments are then "
      "float32 workspaces)",
      py::arg("x"), py::arg("gate"), py::arg("k2"), py::arg("vt"), py::arg("out"), py::arg("partial"),
      py::arg("tokens"), py::arg("d_model"), py::arg("d_ff"), py::arg("r"), py::arg("x_row_stride"),
      py::arg("gate_row_stride"), py::arg("k2_row_stride"), py::arg("vt_row_stride"), py::arg("out_row_stride"),
      py::arg("slices"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("k1") = 0,
      py::arg("moments") = 0, py::arg("k1_row_stride") = 0, py::arg("z") = 0.0);
  m.def("spark_ffn_predictor_shared_bytes", &spark_ffn_predictor_shared_bytes,
        "shared memory per block of the fused Spark FFN predictor (spark_ffn.h)", py::arg("tokens"), py::arg("r"));
  m.def("spark_ffn_predictor_tiles", &spark_ffn_predictor_tiles,
        "predictor tiles per token of the fused Spark FFN path: its moments workspace is (tokens, tiles, 2) float32",
        py::arg("d_ff"));
}
