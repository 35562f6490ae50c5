// Augmentation and evaluation transforms: kiln._core.ImageTransform, its options, SampleRandom, and the
// functional forms in kiln._core.transforms (the parity tests compare them with torchvision's).
#include "bindings.hpp"

#include <pybind11/operators.h>

#include <sstream>

#include "kiln/augment.hpp"

namespace kiln::bindings {
namespace {

using HeightWidth = std::pair<int, int>;
using Bounds = std::pair<double, double>;

std::string text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

std::string pair_text(double first, double second) {
  return "(" + text(first) + ", " + text(second) + ")";
}

const char* adjustment_name(ColorAdjustment adjustment) {
  switch (adjustment) {
    case ColorAdjustment::brightness:
      return "brightness";
    case ColorAdjustment::contrast:
      return "contrast";
    case ColorAdjustment::saturation:
      return "saturation";
  }
  return "";
}

void register_options(py::module_& m) {
  py::class_<RandomResizedCropOptions>(m, "RandomResizedCropOptions",
                                       "torchvision.transforms.v2.RandomResizedCrop(size, scale, ratio), bilinear "
                                       "with antialias.")
      .def(py::init([](HeightWidth size, Bounds scale, Bounds ratio) {
             return RandomResizedCropOptions{size.first,   size.second, scale.first,
                                             scale.second, ratio.first, ratio.second};
           }),
           py::kw_only(), py::arg("size"), py::arg("scale") = Bounds{0.08, 1.0},
           py::arg("ratio") = Bounds{3.0 / 4.0, 4.0 / 3.0})
      .def_property_readonly("size", [](const RandomResizedCropOptions& o) { return HeightWidth{o.height, o.width}; })
      .def_property_readonly("scale",
                             [](const RandomResizedCropOptions& o) { return Bounds{o.scale_min, o.scale_max}; })
      .def_property_readonly("ratio",
                             [](const RandomResizedCropOptions& o) { return Bounds{o.ratio_min, o.ratio_max}; })
      .def("__repr__", [](const RandomResizedCropOptions& o) {
        return "RandomResizedCropOptions(size=" + pair_text(o.height, o.width) +
               ", scale=" + pair_text(o.scale_min, o.scale_max) + ", ratio=" + pair_text(o.ratio_min, o.ratio_max) +
               ")";
      });

  py::class_<ColorJitterOptions>(m, "ColorJitterOptions",
                                 "torchvision.transforms.v2.ColorJitter(brightness, contrast, saturation): factors "
                                 "from [max(0, 1 - x), 1 + x], applied in a random order; 0 leaves that one alone.")
      .def(py::init([](double brightness, double contrast, double saturation) {
             return ColorJitterOptions{brightness, contrast, saturation};
           }),
           py::kw_only(), py::arg("brightness") = 0.0, py::arg("contrast") = 0.0, py::arg("saturation") = 0.0)
      .def_readonly("brightness", &ColorJitterOptions::brightness)
      .def_readonly("contrast", &ColorJitterOptions::contrast)
      .def_readonly("saturation", &ColorJitterOptions::saturation)
      .def("__repr__", [](const ColorJitterOptions& o) {
        return "ColorJitterOptions(brightness=" + text(o.brightness) + ", contrast=" + text(o.contrast) +
               ", saturation=" + text(o.saturation) + ")";
      });

  py::class_<RandomErasingOptions>(m, "RandomErasingOptions",
                                   "torchvision.transforms.v2.RandomErasing(p, scale, ratio, value) on uint8 pixels: "
                                   "value is one pixel value (0..255) for every channel, or one per channel.")
      .def(py::init([](double p, Bounds scale, Bounds ratio, std::vector<int> value) {
             return RandomErasingOptions{p, scale.first, scale.second, ratio.first, ratio.second, std::move(value)};
           }),
           py::kw_only(), py::arg("p") = 0.5, py::arg("scale") = Bounds{0.02, 0.33},
           py::arg("ratio") = Bounds{0.3, 3.3}, py::arg("value") = std::vector<int>{0})
      .def_readonly("p", &RandomErasingOptions::p)
      .def_property_readonly("scale", [](const RandomErasingOptions& o) { return Bounds{o.scale_min, o.scale_max}; })
      .def_property_readonly("ratio", [](const RandomErasingOptions& o) { return Bounds{o.ratio_min, o.ratio_max}; })
      .def_readonly("value", &RandomErasingOptions::value)
      .def("__repr__", [](const RandomErasingOptions& o) {
        std::string values;
        for (const int v : o.value) values += (values.empty() ? "" : ", ") + std::to_string(v);
        return "RandomErasingOptions(p=" + text(o.p) + ", scale=" + pair_text(o.scale_min, o.scale_max) +
               ", ratio=" + pair_text(o.ratio_min, o.ratio_max) + ", value=[" + values + "])";
      });

  py::class_<EvalTransformOptions>(m, "EvalTransformOptions",
                                   "Evaluation: torchvision.transforms.v2.Resize(size) then CenterCrop(size). resize "
                                   "(height, 0) brings the shorter edge to height, as Resize(int) does.")
      .def(py::init([](std::optional<HeightWidth> resize, std::optional<HeightWidth> center_crop) {
             return EvalTransformOptions{resize, center_crop};
           }),
           py::kw_only(), py::arg("resize") = py::none(), py::arg("center_crop") = py::none())
      .def_readonly("resize", &EvalTransformOptions::resize)
      .def_readonly("center_crop", &EvalTransformOptions::center_crop)
      .def(py::self == py::self)
      .def("__repr__", [](const EvalTransformOptions& o) {
        const auto size = [](const std::optional<HeightWidth>& s) {
          return s ? pair_text(s->first, s->second) : "None";
        };
        return "EvalTransformOptions(resize=" + size(o.resize) + ", center_crop=" + size(o.center_crop) + ")";
      });

  py::class_<TrainTransformOptions>(m, "TrainTransformOptions",
                                    "Augmentation, in this order: random_resized_crop, horizontal_flip (a "
                                    "probability), color_jitter, random_erasing; each off when None (or 0).")
      .def(py::init([](std::optional<RandomResizedCropOptions> random_resized_crop, double horizontal_flip,
                       std::optional<ColorJitterOptions> color_jitter,
                       std::optional<RandomErasingOptions> random_erasing) {
             return TrainTransformOptions{random_resized_crop, horizontal_flip, color_jitter, random_erasing};
           }),
           py::kw_only(), py::arg("random_resized_crop") = py::none(), py::arg("horizontal_flip") = 0.0,
           py::arg("color_jitter") = py::none(), py::arg("random_erasing") = py::none())
      .def_readonly("random_resized_crop", &TrainTransformOptions::random_resized_crop)
      .def_readonly("horizontal_flip", &TrainTransformOptions::horizontal_flip)
      .def_readonly("color_jitter", &TrainTransformOptions::color_jitter)
      .def_readonly("random_erasing", &TrainTransformOptions::random_erasing)
      .def("any", &TrainTransformOptions::any, "Whether any augmentation can change a pixel.");
}

void register_functional(py::module_& m) {
  namespace t = kiln::transforms;
  auto f = m.def_submodule("transforms",
                           "torchvision.transforms.v2.functional's forms on uint8 [C, H, W] CPU tensors, for the same "
                           "parameters; sizes are (height, width). Each returns a new tensor.");
  const auto release = py::call_guard<py::gil_scoped_release>();
  f.def("crop", &t::crop, py::arg("image"), py::arg("top"), py::arg("left"), py::arg("height"), py::arg("width"),
        release, "crop(image, top, left, height, width); pixels outside the image are 0.");
  f.def(
      "resized_crop",
      [](const at::Tensor& image, int top, int left, int height, int width, HeightWidth size) {
        return t::resized_crop(image, top, left, height, width, size.first, size.second);
      },
      py::arg("image"), py::arg("top"), py::arg("left"), py::arg("height"), py::arg("width"), py::arg("size"), release,
      "resized_crop(image, top, left, height, width, size): bilinear, antialias=True.");
  f.def(
      "resize", [](const at::Tensor& image, HeightWidth size) { return t::resize(image, size.first, size.second); },
      py::arg("image"), py::arg("size"), release, "resize(image, (height, width)): bilinear, antialias=True.");
  f.def(
      "center_crop",
      [](const at::Tensor& image, HeightWidth size) { return t::center_crop(image, size.first, size.second); },
      py::arg("image"), py::arg("output_size"), release, "center_crop(image, (height, width)), padding with 0.");
  f.def("horizontal_flip", &t::horizontal_flip, py::arg("image"), release);
  f.def("adjust_brightness", &t::adjust_brightness, py::arg("image"), py::arg("brightness_factor"), release);
  f.def("adjust_contrast", &t::adjust_contrast, py::arg("image"), py::arg("contrast_factor"), release);
  f.def("adjust_saturation", &t::adjust_saturation, py::arg("image"), py::arg("saturation_factor"), release);
  f.def("erase", &t::erase, py::arg("image"), py::arg("top"), py::arg("left"), py::arg("height"), py::arg("width"),
        py::arg("value"), release, "erase(image, top, left, height, width, value): value is 1 or C pixel values.");
}

}  // namespace

void register_augment(py::module_& m) {
  py::class_<SampleRandom>(m, "SampleRandom",
                           "The per-sample random stream of kiln's augmentation (xoshiro256**, seeded by splitmix64 "
                           "from a seed, or from a run's seed, an epoch and a sample's position in it).")
      .def(py::init<std::uint64_t>(), py::arg("seed"))
      .def(py::init<std::uint64_t, std::uint64_t, std::uint64_t>(), py::arg("seed"), py::arg("epoch"),
           py::arg("position"))
      .def("next", &SampleRandom::next)
      .def("uniform", &SampleRandom::uniform, py::arg("low") = 0.0, py::arg("high") = 1.0, "A double in [low, high).")
      .def("integer", &SampleRandom::integer, py::arg("low"), py::arg("high"), "An integer in [low, high].");

  register_options(m);

  py::class_<CropBox>(m, "CropBox", "A rectangle of an image, in pixels.")
      .def_readonly("top", &CropBox::top)
      .def_readonly("left", &CropBox::left)
      .def_readonly("height", &CropBox::height)
      .def_readonly("width", &CropBox::width)
      .def(py::self == py::self)
      .def("__repr__", [](const CropBox& b) {
        return "CropBox(top=" + std::to_string(b.top) + ", left=" + std::to_string(b.left) +
               ", height=" + std::to_string(b.height) + ", width=" + std::to_string(b.width) + ")";
      });

  py::class_<TransformDraw>(m, "TransformDraw", "What one call of a training transform drew, in the order it applies.")
      .def_readonly("resized_crop", &TransformDraw::resized_crop)
      .def_readonly("horizontal_flip", &TransformDraw::horizontal_flip)
      .def_property_readonly(
          "color",
          [](const TransformDraw& d) {
            std::vector<std::pair<std::string, double>> steps;
            for (int i = 0; i < d.color_step_count; ++i) {
              steps.emplace_back(adjustment_name(d.color_steps[i].adjustment), d.color_steps[i].factor);
            }
            return steps;
          },
          "color_jitter's (adjustment, factor) pairs in the order applied.")
      .def_readonly("erase", &TransformDraw::erase);

  m.def("random_resized_crop_params", &random_resized_crop_params, py::arg("height"), py::arg("width"),
        py::arg("options"), py::arg("random"), "RandomResizedCrop's box for an image of (height, width).");
  m.def("random_erasing_params", &random_erasing_params, py::arg("height"), py::arg("width"), py::arg("options"),
        py::arg("random"), "RandomErasing's box once it erases, or None when no attempt fits.");

  py::class_<ImageTransform>(m, "ImageTransform",
                             "The transform a split is read with: training (augmentation) or evaluation "
                             "(resize, center_crop), on uint8 [C, H, W] pixels.")
      .def(py::init<TrainTransformOptions, EvalTransformOptions, int>(), py::arg("train"), py::arg("eval"),
           py::arg("channels"))
      .def_static("evaluation", &ImageTransform::evaluation, py::arg("eval"), py::arg("channels"))
      .def(
          "apply",
          [](const ImageTransform& transform, const at::Tensor& image, std::uint64_t seed, std::uint64_t epoch,
             std::uint64_t position) {
            SampleRandom random(seed, epoch, position);
            return transform.apply(image, random);
          },
          py::arg("image"), py::arg("seed") = 0, py::arg("epoch") = 0, py::arg("position") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "uint8 [C, H, W] -> uint8 [C, H', W'], random draws from SampleRandom(seed, epoch, position).")
      .def(
          "draw",
          [](const ImageTransform& transform, int height, int width, std::uint64_t seed, std::uint64_t epoch,
             std::uint64_t position) {
            SampleRandom random(seed, epoch, position);
            return transform.draw(height, width, random);
          },
          py::arg("height"), py::arg("width"), py::arg("seed") = 0, py::arg("epoch") = 0, py::arg("position") = 0,
          "The parameters apply(image, seed, epoch, position) draws for a (height, width) image.")
      .def("output_size", &ImageTransform::output_size, py::arg("height"), py::arg("width"))
      .def("random", &ImageTransform::random, "Whether apply() draws random numbers.")
      .def("identity", &ImageTransform::identity, "Whether the output is always the input.")
      .def_property_readonly("train_options", &ImageTransform::train_options)
      .def_property_readonly("eval_options", &ImageTransform::eval_options);

  register_functional(m);
}

}  // namespace kiln::bindings
