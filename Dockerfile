# trb_nemo on an NVIDIA NGC PyTorch image: CUDA, NCCL, Transformer Engine and apex come from the
# image; the project is installed on top without replacing the image's torch.
# Build:            docker build -t trb-nemo:latest .
# For pyxis/enroot: enroot import -o trb-nemo.sqsh dockerd://trb-nemo:latest
#                   (then launcher.container_image=/path/to/trb-nemo.sqsh; see launcher/README.md)
# Lint (CI does):   hadolint Dockerfile
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/trb_nemo
COPY pyproject.toml README.md ./
COPY trb_nemo ./trb_nemo
COPY conf ./conf
COPY examples ./examples
COPY scripts ./scripts

# --no-deps for torch: keep the image's CUDA build; everything else resolves normally.
RUN pip install --no-build-isolation --no-deps -e . \
 && pip install "megatron-core>=0.19,<0.20" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" \
        "safetensors>=0.4" "transformers>=4.51" "math-verify>=0.7" "pyarrow>=14" "psutil>=5.9" \
        "tqdm>=4.66" "tensorboard>=2.15" "matplotlib>=3.8"

ENTRYPOINT ["trb-nemo"]
CMD ["--help"]
