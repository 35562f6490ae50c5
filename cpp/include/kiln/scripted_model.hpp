// Models users bring from Python (model=python:<module>:<callable>): kiln.custom_model scripts the
// module with torch.jit.script and hands kiln the TorchScript archive, which kiln trains with its
// C++ loop and stores in the checkpoint, so inference rebuilds the model without the user's module.
// A TorchScript archive is code (TorchScript's restricted language, not pickled Python): load
// checkpoints of python: models from trusted sources only.
#pragma once

#include <memory>
#include <optional>
#include <string>

namespace kiln {

class Classifier;

// Whether `name` names a model brought from Python ("python:<module>:<callable>").
bool is_scripted_model_name(const std::string& name);

// Makes the TorchScript archive (torch.jit.save's bytes) of model `name` known to make_model in this
// process; the same name again replaces it.
void register_scripted_model(const std::string& name, std::string archive);

// The archive registered for `name`, if any.
std::optional<std::string> scripted_model_archive(const std::string& name);

// Loads the archive registered for `name` as a Classifier whose parameters and buffers are the
// TorchScript module's, under the same names; throws kiln::DataError when none is registered or the
// archive does not load.
std::shared_ptr<Classifier> make_scripted_model(const std::string& name);

}  // namespace kiln
