/* Empty translation unit: SwiftPM needs one source file to expose cuda/include/qlcuda.h to
 * Swift as the module CQLCuda (types only; the plugin itself is built by `make cuda`). */
#include "qlcuda.h"
