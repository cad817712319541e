from .pipeline_ddpm import DDPMPipeline
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, numpy_to_pil

__all__ = ["DDPMPipeline", "DiffusionPipeline", "ImagePipelineOutput", "numpy_to_pil"]
