# One image for every c5snn service. CPU torch by default; the CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t c5snn:cuda .
# (docker-compose.yml builds that one for the GPU workers).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# jemalloc: CPU workers restart themselves on it (c5snn/runtime.py; a third less peak memory);
# g++: CPU workers compile c5snn/kernels/cpu for the CPU they run on (cached per user and CPU)
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 g++ && \
    rm -rf /var/lib/apt/lists/*
RUN pip install torch --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY c5snn ./c5snn
COPY studies ./studies
COPY data ./data
RUN pip install ".[dashboard]"

RUN useradd --create-home c5snn && mkdir -p /artifacts /app/results && \
    chown c5snn /artifacts /app/results
USER c5snn
RUN python -c "from c5snn.kernels import backend; backend()"  # prebuilt for the build machine's CPU
ENTRYPOINT ["c5snn"]
CMD ["--help"]
