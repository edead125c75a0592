#include <ATen/ATen.h>

#include "sampling.h"

namespace ltfast {
namespace {

void check_index_vector(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

// The class table is checked on every device: an empty class would make the kernels draw
// `hash % 0` and read outside `members`. For tables on a GPU this copies C + 1 offsets to the host,
// one synchronisation per call; the samplers call these ops once per epoch shard, not per step.
void check_class_table_values(const at::Tensor& device_offsets, const at::Tensor& members, const char* op) {
  const at::Tensor offsets = device_offsets.is_cpu() ? device_offsets : device_offsets.to(at::kCPU);
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t num_classes = offsets.numel() - 1;
  TORCH_CHECK_VALUE(o[0] == 0, op, ": class_offsets must start at 0, got ", o[0]);
  for (int64_t c = 0; c < num_classes; ++c) {
    TORCH_CHECK_VALUE(o[c + 1] > o[c], op, ": class_offsets must be strictly increasing (every class non-empty); "
                      "class ", c, " has offsets ", o[c], "..", o[c + 1]);
  }
  TORCH_CHECK_VALUE(o[num_classes] == members.numel(), op, ": class_offsets must end at members.numel() = ",
                    members.numel(), ", got ", o[num_classes]);
}

SamplingArgs prepare_common(const char* op, const at::Tensor& class_offsets, const at::Tensor& members, int64_t seed,
                            int64_t epoch, int64_t start, int64_t count, int64_t epoch_length) {
  check_index_vector(class_offsets, "class_offsets", op);
  check_index_vector(members, "members", op);
  TORCH_CHECK_VALUE(class_offsets.numel() >= 2, op, ": class_offsets must have C + 1 >= 2 entries, got ",
                    class_offsets.numel());
  TORCH_CHECK(members.device() == class_offsets.device(), op, ": members must be on the same device as class_offsets (",
              class_offsets.device(), "), got ", members.device());
  TORCH_CHECK_VALUE(epoch >= 0, op, ": epoch must be >= 0, got ", epoch);
  TORCH_CHECK_VALUE(start >= 0, op, ": start must be >= 0, got ", start);
  TORCH_CHECK_VALUE(count >= 0, op, ": count must be >= 0, got ", count);
  // Compared as count <= epoch_length - start (both sides >= 0 here): start + count overflowed
  // int64 for start = 2**63 - 5, count = 10 and passed the check as a negative number.
  TORCH_CHECK_VALUE(start <= epoch_length && count <= epoch_length - start, op, ": start + count (", start, " + ",
                    count, ") must not exceed epoch_length (", epoch_length, ")");
  SamplingArgs args;
  args.class_offsets = class_offsets.contiguous();
  args.members = members.contiguous();
  check_class_table_values(args.class_offsets, args.members, op);
  args.num_classes = class_offsets.numel() - 1;
  args.seed = static_cast<uint64_t>(seed);
  args.epoch = epoch;
  args.start = start;
  args.count = count;
  args.epoch_length = epoch_length;
  return args;
}

}  // namespace

SamplingArgs prepare_class_aware_args(const at::Tensor& class_offsets, const at::Tensor& members, int64_t seed,
                                      int64_t epoch, int64_t start, int64_t count, int64_t num_samples_cls,
                                      int64_t epoch_length) {
  const char* op = "ltfast.class_aware_sample";
  TORCH_CHECK_VALUE(num_samples_cls >= 1, op, ": num_samples_cls must be >= 1, got ", num_samples_cls);
  SamplingArgs args = prepare_common(op, class_offsets, members, seed, epoch, start, count, epoch_length);
  args.per_class = num_samples_cls;
  return args;
}

SamplingArgs prepare_weighted_args(const at::Tensor& class_cdf, const at::Tensor& class_offsets,
                                   const at::Tensor& members, int64_t seed, int64_t epoch, int64_t start,
                                   int64_t count, int64_t epoch_length) {
  const char* op = "ltfast.class_weighted_sample";
  SamplingArgs args = prepare_common(op, class_offsets, members, seed, epoch, start, count, epoch_length);
  TORCH_CHECK_VALUE(class_cdf.dim() == 1 && class_cdf.numel() == args.num_classes, op,
                    ": class_cdf must be a 1-D tensor with C = ", args.num_classes,
                    " entries (one per class of class_offsets), got shape ", class_cdf.sizes());
  TORCH_CHECK_TYPE(class_cdf.scalar_type() == at::kDouble, op, ": class_cdf must be float64, got ",
                   class_cdf.scalar_type());
  TORCH_CHECK(class_cdf.device() == class_offsets.device(), op,
              ": class_cdf must be on the same device as class_offsets (", class_offsets.device(), "), got ",
              class_cdf.device());
  args.class_cdf = class_cdf.contiguous();
  {  // on every device, as the class table (a host copy of C doubles for a GPU tensor)
    const at::Tensor host_cdf = args.class_cdf.is_cpu() ? args.class_cdf : args.class_cdf.to(at::kCPU);
    const double* cdf = host_cdf.data_ptr<double>();
    double previous = 0.0;
    for (int64_t c = 0; c < args.num_classes; ++c) {
      TORCH_CHECK_VALUE(cdf[c] >= previous && cdf[c] <= 1.0, op,
                        ": class_cdf must be non-decreasing within [0, 1]; entry ", c, " is ", cdf[c]);
      previous = cdf[c];
    }
    TORCH_CHECK_VALUE(cdf[args.num_classes - 1] == 1.0, op, ": class_cdf must end at 1, got ",
                      cdf[args.num_classes - 1]);
  }
  return args;
}

}  // namespace ltfast
