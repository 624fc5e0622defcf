"""backbones: fine-tune pretrained image backbones and compare them fairly."""
