"""Run trained models outside training: inference backends, ONNX / int8 export, prediction."""
