"""Agent endpoints: registration (bootstrap secret) and the staff views."""

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from agents_app import selectors, services
from streamspace.text import PlainTextField


class AgentSerializer(serializers.Serializer):
    agent_id = serializers.CharField()
    platform = serializers.CharField()
    region = serializers.CharField()
    status = serializers.CharField()
    drain_requested = serializers.BooleanField()
    capacity = serializers.JSONField()
    cpu_overcommit = serializers.FloatField()
    memory_overcommit = serializers.FloatField()
    metadata = serializers.JSONField()
    version = serializers.CharField()
    connected = serializers.BooleanField(source="is_connected")
    last_heartbeat = serializers.DateTimeField(allow_null=True)
    active_sessions = serializers.IntegerField(required=False)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class AgentRegisteredSerializer(AgentSerializer):
    token = serializers.CharField(required=False, help_text="the agent's token: on creation only, shown once")


class AgentRegisterSerializer(serializers.Serializer):
    agent_id = PlainTextField(max_length=255)
    platform = PlainTextField(max_length=20)
    region = PlainTextField(max_length=100, required=False, allow_blank=True, default="")
    capacity = serializers.DictField(required=False, default=dict)
    metadata = serializers.DictField(required=False, default=dict)
    agent_token = PlainTextField(required=False, allow_blank=True, write_only=True)


class AgentRegisterView(APIView):
    """Agents register with the bootstrap secret (``AGENT_BOOTSTRAP_TOKEN``) as a Bearer token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=AgentRegisterSerializer,
        responses={201: AgentRegisteredSerializer, 200: AgentRegisteredSerializer},
        examples=[
            OpenApiExample(
                "a Docker agent",
                value={
                    "agent_id": "docker-eu-1",
                    "platform": "docker",
                    "region": "eu",
                    "capacity": {"cpu": 8, "memory_mb": 16384, "max_sessions": 10},
                    "metadata": {"hostname": "host-1"},
                },
                request_only=True,
            )
        ],
    )
    def post(self, request):
        if not settings.AGENT_BOOTSTRAP_TOKEN:
            return Response(
                {"error": "registration_disabled", "detail": "AGENT_BOOTSTRAP_TOKEN is not configured"}, status=403
            )
        if not services.bootstrap_token_matches(
            services.bearer_token(request.headers.get("Authorization")), settings.AGENT_BOOTSTRAP_TOKEN
        ):
            return Response({"error": "unauthorized", "detail": "wrong or missing bootstrap secret"}, status=401)
        if not isinstance(request.data, dict):
            return Response({"error": "invalid", "detail": "expected a JSON object"}, status=400)
        form = AgentRegisterSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        agent, token, created = services.agent_register(
            agent_id=data["agent_id"],
            platform=data["platform"],
            region=data["region"],
            capacity=data["capacity"],
            metadata=data["metadata"],
            agent_token=data.get("agent_token") or None,
        )
        body = AgentSerializer(agent).data
        if token:
            body["token"] = token  # shown once; stored hashed
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class AgentListView(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(
        parameters=[
            OpenApiParameter("platform", str),
            OpenApiParameter("status", str),
            OpenApiParameter("region", str),
        ],
        responses=AgentSerializer(many=True),
    )
    def get(self, request):
        qp = request.query_params
        agents = selectors.agent_list(
            platform=qp.get("platform", ""), status=qp.get("status", ""), region=qp.get("region", "")
        )
        return Response(AgentSerializer(agents, many=True).data)


class AgentDetailView(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(responses=AgentSerializer)
    def get(self, request, agent_id):
        agent = selectors.agent_list().filter(agent_id=agent_id).first() or selectors.agent_get(agent_id=agent_id)
        return Response(AgentSerializer(agent).data)

    @extend_schema(responses={204: None})
    def delete(self, request, agent_id):
        services.agent_delete(agent=selectors.agent_get(agent_id=agent_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
