"""``jetson``: TensorRT on NVIDIA Jetson (or any NVIDIA GPU host).

The bundle carries ONNX (the QDQ graph for int8, the fp32 graph for fp16/fp32)
plus a build recipe; the engine is built on the device by `engine.build_engine`
and cached keyed by GPU model and TensorRT version (`engine.EngineCache`),
because an engine does not move between them.
"""
