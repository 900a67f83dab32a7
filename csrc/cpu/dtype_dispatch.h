// Student/teacher dtype dispatch of the CPU kernels that take a student and teacher(s): float64
// with float64, or a student of float32, bfloat16 or float16 with a teacher of any of those three
// (the combinations the ops' argument checks accept).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fastkd {
namespace CPU_CAPABILITY {

// Calls run(S{}, T{}), S and T the C++ types of the student's and the teacher's dtype.
template <typename F>
void dispatch_student_teacher(c10::ScalarType student, c10::ScalarType teacher, const F& run) {
  auto with_teacher = [&](auto student_tag) {
    switch (teacher) {
      case c10::ScalarType::Float:
        return run(student_tag, float{});
      case c10::ScalarType::BFloat16:
        return run(student_tag, c10::BFloat16{});
      case c10::ScalarType::Half:
        return run(student_tag, c10::Half{});
      default:
        TORCH_CHECK(false, "fastkd: unsupported teacher dtype ", teacher);
    }
  };
  switch (student) {
    case c10::ScalarType::Double:
      return run(double{}, double{});
    case c10::ScalarType::Float:
      return with_teacher(float{});
    case c10::ScalarType::BFloat16:
      return with_teacher(c10::BFloat16{});
    case c10::ScalarType::Half:
      return with_teacher(c10::Half{});
    default:
      TORCH_CHECK(false, "fastkd: unsupported student dtype ", student);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
